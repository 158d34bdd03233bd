//! [`ConfigError`]: every problem with a config file, rendered as one line that names
//! the file, the line and the key.

use std::fmt;
use std::path::PathBuf;

/// Why a config file could not be used. `Display` renders exactly one line:
///
/// - `FILE: cannot read: <io error>`
/// - `FILE:LINE: <TOML syntax error>`
/// - `FILE:LINE: key `PATH`: <what is wrong>` (the line is left out only where there is
///   nothing in the file to point at, e.g. a missing `[resource]` table)
/// - `FILE: no node named "gamma" (nodes: alpha, beta)`
/// - `FILE: no node matches this host's name "vm"; pass --node (nodes: alpha, beta)`
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8, ...).
    #[error("{}: cannot read: {io}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error (already part of the message, so not a `source()`).
        io: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}", Located { path, line: *line, key: None, message })]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the error, when the parser reported a position.
        line: Option<usize>,
        /// What is wrong (one line).
        message: String,
    },
    /// The file is valid TOML, but a key is unknown, missing, of the wrong type or has
    /// a value that is not allowed.
    #[error("{}", Located { path, line: *line, key: Some(key), message })]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// 1-based line the error points at.
        line: Option<usize>,
        /// Dotted key path with array indices, e.g. `node[1].nbd`.
        key: String,
        /// What is wrong (one line), with a hint where one helps.
        message: String,
    },
    /// `--node NAME` names no node of the resource.
    #[error("{}: no node named {name:?} (nodes: {})", path.display(), nodes.join(", "))]
    NoSuchNode {
        /// The config file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The names of the nodes in the file, in file order.
        nodes: Vec<String>,
    },
    /// No `--node` was given and no node is named like this host.
    #[error(
        "{}: no node matches this host's name {hostname:?}; pass --node (nodes: {})",
        path.display(),
        nodes.join(", ")
    )]
    NoHostMatch {
        /// The config file.
        path: PathBuf,
        /// This host's name (`gethostname`).
        hostname: String,
        /// The names of the nodes in the file, in file order.
        nodes: Vec<String>,
    },
    /// No `--node` was given and this host's name could not be determined.
    #[error("{}: cannot determine this host's name: {io}; pass --node", path.display())]
    Hostname {
        /// The config file.
        path: PathBuf,
        /// The underlying error (already part of the message, so not a `source()`).
        io: std::io::Error,
    },
}

impl ConfigError {
    /// The 1-based line the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => *line,
            _ => None,
        }
    }

    /// The dotted key path the error is about (`resource.protocol`, `node[1].nbd`), if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// `FILE[:LINE]: [key `K`: ]MESSAGE`
struct Located<'a> {
    path: &'a PathBuf,
    line: Option<usize>,
    key: Option<&'a str>,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}
