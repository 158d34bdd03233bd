//! The `blockctl` command line (clap), as a library: `main.rs` parses it, and the
//! `blockd-docgen` tool renders `blockctl(8)` and the shell completions from this
//! same definition, so the documentation cannot drift from the binary.
//!
//! Everything else of `blockctl` (the verbs' work) stays in the binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where resource config files live unless `--config-dir` or `BLOCKD_CONFIG_DIR`
/// says otherwise.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/blockd";

#[derive(Parser)]
#[command(
    name = "blockctl",
    version,
    about = "Operate blockd resources",
    long_about = "Operate blockd resources: create metadata, start and stop nodes, switch roles, \
                  resync and verify, show status and events, attach the Primary as a kernel \
                  block device. blockctl talks to a running node through its control socket and \
                  never touches the disks of a running resource."
)]
pub struct Cli {
    /// The resource's config file (default CONFIG_DIR/RESOURCE.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Where resource config files are looked up: RESOURCE.toml for a verb naming a
    /// resource, every *.toml for `status` without one.
    #[arg(long, global = true, env = "BLOCKD_CONFIG_DIR", default_value = DEFAULT_CONFIG_DIR)]
    pub config_dir: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long, global = true)]
    pub node: Option<String>,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand)]
pub enum Verb {
    /// Initialize this node's metadata (the node must be stopped, or its disk
    /// detached: `detach-disk`).
    CreateMd {
        resource: Option<String>,
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
        /// The disks of both nodes are known to be identical (e.g. both empty): skip
        /// the initial full sync. Use on both nodes.
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Start blockd for this node in the background; returns once it answers.
    Up {
        resource: Option<String>,
        /// Where blockd logs (default /var/log/blockd/RESOURCE-NODE.log).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Stop this node's blockd cleanly.
    Down { resource: Option<String> },
    /// Make this node Primary (refused while the peer is Primary or the local disk is
    /// not UpToDate, unless --force).
    Primary {
        resource: Option<String>,
        /// Promote even with a disk that is not UpToDate (the first promotion of a
        /// fresh pair, which then full-syncs the peer).
        #[arg(long)]
        force: bool,
    },
    /// Make this node Secondary (refused while NBD clients are connected, unless --force).
    Secondary {
        resource: Option<String>,
        /// Close connected NBD clients (each answers what it has in flight) instead of
        /// refusing.
        #[arg(long)]
        force: bool,
    },
    /// Show role, disk, connection and replication state. Without a resource (and
    /// without --config): every resource in CONFIG_DIR/*.toml that has a node on this
    /// host, stopped ones included, like `drbdadm status`.
    Status {
        resource: Option<String>,
        /// One JSON object (SPEC §8.1 fields); for all resources, an array of them
        /// (a stopped one has `"running": false`).
        #[arg(long)]
        json: bool,
        /// Add counters (bytes replicated and sent for resync, unsent bytes,
        /// activity log, generations).
        #[arg(long, short)]
        verbose: bool,
    },
    /// Stream state changes (`exists` lines first, then `change` lines) until
    /// interrupted, like `drbdsetup events2`.
    Events {
        resource: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// Discard this node's data and resync it in full from the peer (Secondary only).
    Invalidate { resource: Option<String> },
    /// Discard the peer's data and resync it in full from this node (the peer must
    /// be Secondary).
    InvalidateRemote { resource: Option<String> },
    /// Hold resync (now and later) until `resume-sync`.
    PauseSync { resource: Option<String> },
    /// Let resync go on after `pause-sync`.
    ResumeSync { resource: Option<String> },
    /// Connect to the peer again (after a split brain or `disconnect`). With
    /// --discard-my-data this node drops its changes and resyncs from the peer.
    Connect {
        resource: Option<String>,
        /// After a split brain: this node's changes are dropped and it resyncs from
        /// the peer.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Close the connection to the peer; this node stays StandAlone until `connect`.
    Disconnect { resource: Option<String> },
    /// Detach this node's disk on purpose, as after an I/O error: the node goes on
    /// Diskless (a Primary only while its peer is connected and UpToDate: it then
    /// serves through the peer), the peer tracks every write in its bitmap, and the
    /// disk's metadata is closed, so the disk can be repaired or replaced (then
    /// `create-md --force`) while the node runs.
    DetachDisk { resource: Option<String> },
    /// Bring a detached disk back (Secondary with a Diskless disk only): the node
    /// restarts inside the running daemon (same PID) from the disk's metadata and
    /// resyncs from the peer, a bitmap or a full resync as the generations say.
    /// Refused, with the node still running, when the disk's metadata is missing,
    /// belongs to another node or cannot be written.
    AttachDisk { resource: Option<String> },
    /// Compare every granule with the peer (digests) while in use; waits until done
    /// and prints the bytes found out of sync. With --repair, resyncs them.
    Verify {
        resource: Option<String>,
        /// Resync the granules found out of sync (the peer becomes the sync target).
        #[arg(long)]
        repair: bool,
    },
    /// Print this node's metadata (the node must be stopped).
    DumpMd { resource: Option<String> },
    /// Write the blocks this node had changed before a split brain was resolved
    /// against it (`connect --discard-my-data` keeps them in its undo-dir) as an image
    /// for recovery: at their offsets in a sparse file of the device's size, or over
    /// a copy of --base for a full image of the discarded data. Reads the newest kept
    /// journal of RESOURCE (or --journal); works offline, without the daemon.
    ExportDiscarded {
        resource: Option<String>,
        /// The image to write (created or replaced; a regular file).
        #[arg(long, value_name = "FILE")]
        output: PathBuf,
        /// The kept journal to read (default: the newest RESOURCE.discarded.*.undo in
        /// the node's undo-dir). With --journal no config is needed.
        #[arg(long, value_name = "PATH")]
        journal: Option<PathBuf>,
        /// Copy this image first (of the device's size exactly: e.g. the current
        /// device, taken with nbdcopy) and write the saved blocks over it.
        #[arg(long, value_name = "IMAGE")]
        base: Option<PathBuf>,
    },
    /// Make a CA and a certificate and key for every node of the config (TLS on the
    /// peer link and for NBD), plus one for NBD clients. Writes into --out-dir
    /// (default: tls/RESOURCE/ beside the config file); files are mode 0600 and
    /// never overwritten. Prints the config keys to add.
    GenCerts {
        resource: Option<String>,
        /// Where to write (default: tls/RESOURCE beside the config file).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Another name or address NBD clients use for the nodes (added to every
        /// node's certificate besides its name and its TCP `nbd` hosts); repeatable.
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
    /// Print the effective config (every key, defaults filled in) after validating it.
    Show { resource: Option<String> },
    /// Attach the resource's Primary as a kernel block device (/dev/nbdN) through the
    /// kernel NBD client. Tries every node's `nbd` address; a resident process stays
    /// to reconnect the device to the new Primary after a failover (I/O waits up to
    /// --dead-conn-timeout-secs meanwhile). Needs root and the nbd module.
    Attach {
        resource: String,
        /// The device, e.g. /dev/nbd0.
        device: PathBuf,
        /// Connections (sockets) per device; more than 1 needs a multi-conn export.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Per-request I/O timeout: a request unanswered this long marks its
        /// connection dead and is retried on the reconnected one.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// How long I/O waits for a reconnect after every connection died (then it
        /// fails with EIO).
        #[arg(long, default_value_t = 120)]
        dead_conn_timeout_secs: u64,
        /// Use the legacy ioctl interface even where netlink is available (no
        /// reconnect after a failover).
        #[arg(long)]
        ioctl: bool,
        /// Stay in the foreground instead of leaving a resident process.
        #[arg(long)]
        foreground: bool,
        /// Where the resident logs (default /var/log/blockd/attach-nbdN.log).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Disconnect a device attached with `attach`. Refused while it is mounted, held
    /// or open, unless --force.
    Detach {
        /// The device (/dev/nbdN); or the resource, which the device must be
        /// attached to, followed by the device.
        #[arg(value_name = "RESOURCE|DEVICE")]
        first: String,
        /// The device, when the first argument names the resource.
        device: Option<String>,
        /// Disconnect even while in use: outstanding and later I/O fails.
        #[arg(long)]
        force: bool,
    },
}
