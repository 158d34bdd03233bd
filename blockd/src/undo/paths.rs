//! Where journals live: in the node's `undo-dir`, `<resource>.undo` for the
//! catch-up in progress, `<resource>.discarded.<unix-seconds>.undo` for each kept
//! journal of a discarded split-brain side.
//!
//! Resource names use `[A-Za-z0-9_.-]`, so a resource named like
//! `r0.discarded.17` would have its catch-up journal listed as a discarded one of
//! `r0`; a node's `undo-dir` holds its own resources only, and nobody names them so.

use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use super::UndoError;

/// The journal of a catch-up of `resource`: `<dir>/<resource>.undo`.
pub fn catchup_path(dir: &Path, resource: &str) -> PathBuf {
    dir.join(format!("{resource}.undo"))
}

/// A kept journal of a discarded side: `<dir>/<resource>.discarded.<unix_s>.undo`.
pub fn discarded_path(dir: &Path, resource: &str, unix_s: u64) -> PathBuf {
    dir.join(format!("{resource}.discarded.{unix_s}.undo"))
}

/// A kept journal found by [`list_discarded`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscardedJournal {
    pub path: PathBuf,
    /// When it was kept, Unix seconds (from its name).
    pub unix_s: u64,
}

/// The kept journals of `resource` in `dir`, newest first; none if `dir` does not
/// exist.
pub fn list_discarded(dir: &Path, resource: &str) -> Result<Vec<DiscardedJournal>, UndoError> {
    let io = |op| move |source| UndoError::Io { path: dir.to_owned(), op, source };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list")(e)),
    };
    let prefix = format!("{resource}.discarded.");
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("list"))?;
        let name = entry.file_name();
        let Some(stamp) = name.to_str().and_then(|n| n.strip_prefix(&prefix)?.strip_suffix(".undo")) else {
            continue;
        };
        if stamp.is_empty() || !stamp.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(unix_s) = stamp.parse() {
            found.push(DiscardedJournal { path: entry.path(), unix_s });
        }
    }
    found.sort_by(|a, b| b.unix_s.cmp(&a.unix_s).then_with(|| a.path.cmp(&b.path)));
    Ok(found)
}

/// Renames `from` to `to`, refusing to replace a file there (`RENAME_NOREPLACE`;
/// where the filesystem does not support it, a check just before a plain rename).
pub(super) fn rename_no_replace(from: &Path, to: &Path) -> Result<(), UndoError> {
    let io = |op| move |source| UndoError::Io { path: from.to_owned(), op, source };
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Err(UndoError::Exists { path: to.to_owned() }),
        Err(nix::errno::Errno::EINVAL) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(UndoError::Exists { path: to.to_owned() });
            }
            std::fs::rename(from, to).map_err(io("rename"))
        }
        Err(e) => Err(io("rename")(e.into())),
    }
}
