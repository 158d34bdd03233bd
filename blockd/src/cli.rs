//! The `blockd` command line (clap), as a library: `main.rs` parses it, and the
//! `blockd-docgen` tool renders `blockd(8)` and the shell completions from this same
//! definition.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::storage::EngineKind;

#[derive(Parser)]
#[command(
    name = "blockd",
    version,
    about = "Userspace replicated block device daemon",
    long_about = "blockd runs one node of a replicated block device (a resource): it owns the \
                  node's backing store, exports it over NBD while Primary, mirrors every write \
                  to the peer, and keeps a persistent dirty bitmap for resync. Operators use \
                  blockctl(8); the config file is described in blockd.toml(5)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run one node of a resource in the foreground.
    Run {
        /// The resource's config file.
        #[arg(long)]
        config: PathBuf,
        /// This node's name in the config (default: the host name).
        #[arg(long)]
        node: Option<String>,
        /// I/O engine: auto (io_uring, else posix), uring, or posix.
        #[arg(long, default_value = "auto")]
        io_engine: EngineKind,
    },
}
