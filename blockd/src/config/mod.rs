//! The resource config file (SPEC §8.1): one TOML file per resource, shared by all its
//! nodes.
//!
//! ```toml
//! [resource]
//! name = "r0"
//! protocol = "C"                  # "A" | "B" | "C"; default "C"
//! # size = "10GiB"                # default: the smallest backing store
//! # bitmap-granularity = "4KiB"   # power of two, 4KiB..1MiB; default 4KiB
//! # send-buffer = "64MiB"         # protocol A: frames queued for the peer before
//! #                               # writes wait for acknowledgement; 64KiB..4GiB
//! # al-extents = 1237             # activity-log size in 4 MiB extents; 16..8000
//! # resync-rate = "auto"          # or bytes per second, e.g. "100MiB"; at least 1MiB
//! # resync-min-rate = "8MiB"      # auto: the rate kept while applications write
//! # resync-checksum = false       # resync sends only granules whose digests differ
//! # shared-secret = "…"           # peers authenticate (HMAC challenge); >= 16 bytes;
//! #                               # required when a replication address is not loopback
//! # allow-unauthenticated-peers = false   # opt out of that requirement
//! # tls-ca = "/etc/blockd/tls/r0/ca-cert.pem"  # mutual TLS 1.3 on the peer link:
//! #                               # the CA every node's certificate chains to
//! # on-io-error = "detach"        # or "pass-on": what an error of this node's disk does
//! # ack-timeout = "10s"           # a peer that confirms no write for this long is dropped
//! # on-congestion = "block"       # protocol A, more than congestion-fill queued: writers
//! #                               # wait, or "pull-ahead": stop shipping, resync later
//! # congestion-fill = "64MiB"     # 1MiB..send-buffer
//! # undo-size = "1GiB"            # undo journal of a catching-up target; "0": none
//! # compression = "off"           # or "zstd": Write and resync data on the peer link
//! #                               # (both nodes must say zstd, else it runs uncompressed)
//! # compression-level = 3         # zstd level, 1..19
//! # replication-rate = "100MiB"   # protocols A/B: ship application writes at most this
//! #                               # fast (bytes per second on the wire); default unlimited
//!
//! [[node]]
//! name = "alpha"
//! replication = "127.0.0.1:7789"  # where peers reach this node
//! nbd = "127.0.0.1:10809"         # or "unix:/path", or an array of those
//! disk = "/var/lib/blockd/r0-alpha.img"
//! meta = "internal"               # or an absolute path to external metadata
//! # control = "/run/blockd/r0-alpha.sock"  # this default when absent
//! # control-group = "blockd"    # members may use the control socket (0660)
//! # metrics = "127.0.0.1:9942"  # Prometheus text endpoint, GET /metrics
//! # fence-peer = "/usr/lib/ocf/resource.d/blockd/crm-fence-peer"   # handlers, run
//! # after-resync-target = "/usr/lib/ocf/resource.d/blockd/crm-unfence-peer"  # with sh -c
//! # mlock = false               # mlockall: for a kernel NBD client on the same host
//! # oom-score-adj = -1000       # /proc/self/oom_score_adj at start
//! # tls-cert = "/etc/blockd/tls/r0/alpha/server-cert.pem"  # with resource.tls-ca (both
//! # tls-key = "/etc/blockd/tls/r0/alpha/server-key.pem"    # required then); DNS SAN = name
//! # nbd-tls = "off"             # "on": STARTTLS offered; "require": TCP clients must
//! # nbd-tls-cert = "/etc/blockd/tls/r0/alpha/server-cert.pem"   # use it (Unix-socket
//! # nbd-tls-key = "/etc/blockd/tls/r0/alpha/server-key.pem"     # listeners never require)
//! # nbd-tls-ca = "/etc/blockd/tls/r0/ca-cert.pem"   # optional: client certificates required
//! # undo-dir = "/var/lib/blockd"  # where the undo journals (<resource>.undo) live
//! # worker-threads = 2          # async runtime threads; default 1 standalone, 2 replicated
//! ```
//!
//! # TLS
//!
//! `tls-ca` turns on mutual TLS 1.3 for the peer link: each node presents its
//! `tls-cert`, and a peer's certificate must chain to `tls-ca` and carry the peer's
//! node name as a DNS-name subjectAltName (node names must then be valid DNS
//! names). `nbd-tls` offers (`"on"`) or requires (`"require"`) `NBD_OPT_STARTTLS` on the
//! node's TCP `nbd` listeners; Unix-socket listeners accept STARTTLS but never
//! require it, so `nbd = ["unix:/run/blockd/r0.nbd", "0.0.0.0:10809"]` with
//! `nbd-tls = "require"` gives a local kernel client (which cannot do TLS) a
//! plaintext path and everyone else TLS. Certificate files are read at each new
//! connection: replacing them rotates certificates without a restart.
//! `blockctl gen-certs` makes a CA and the files for every node.
//!
//! Types:
//! - [`Config`]: the validated file: its path, the [`ResourceConfig`] and the nodes in
//!   file order. [`Config::load`] reads and validates a file, [`Config::parse`] validates
//!   text; [`Config::local_node`] picks this host's node (`--node` or the host name) and
//!   [`Config::peers`] the others; [`Config::check_local`] checks the local node's
//!   disk and metadata paths against this machine.
//! - [`ResourceConfig`]: name, [`Protocol`], optional size and the bitmap granularity,
//!   both in bytes, the send buffer, the activity-log size, and the resync settings
//!   ([`ResyncRate`], minimum rate, checksum mode).
//! - [`NodeConfig`]: name, replication address ([`HostPort`]), NBD listen addresses
//!   ([`ListenAddr`], TCP or Unix), disk, [`MetaLocation`] and control socket path.
//! - [`ConfigError`]: every problem as one line, `FILE:LINE: key `PATH`: what is wrong`.
//!
//! Sizes are a TOML integer (bytes) or a string with an optional binary unit (`B`,
//! `KiB`, `MiB`, `GiB`, `TiB`; `"4 KiB"` is fine, `"10GB"` is refused with a hint).
//! Rates are sizes per second; a string may end in `/s` (`"100MiB/s"`).
//! Paths must be absolute. Rules checked beyond the types: names are non-empty and
//! use `[A-Za-z0-9_.-]`; node names are unique; no TCP address (replication or NBD)
//! and no Unix socket path (NBD or control) is used twice in the file, since the nodes
//! of a test setup share one host; a replication address is not a wildcard; `nbd` is
//! not empty; the size is a non-zero multiple of 512. More than two nodes are accepted
//! here; the replication layer decides what it supports.
//!
//! Parsing never touches the machine (`blockctl show` works anywhere). What only the
//! node itself can check (the disk exists, opens read-write and is large enough; an
//! external metadata file's directory exists) is [`Config::check_local`], run by
//! `blockd run`, `blockctl create-md` and `blockctl up` before they change anything.

mod disk;
mod error;
mod keys;
mod local;
mod raw;
mod tls;
mod undo;
mod validate;
mod values;
mod wan;

#[cfg(test)]
mod local_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
#[cfg(test)]
mod wan_tests;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

pub use disk::{DEFAULT_ACK_TIMEOUT_MS, IoErrorPolicy, MAX_ACK_TIMEOUT_MS, MIN_ACK_TIMEOUT_MS};
pub use error::ConfigError;
pub use keys::{node_keys, resource_keys};
pub use tls::{NbdTls, NbdTlsMode, PeerTlsFiles, TlsFiles};
pub use undo::{DEFAULT_UNDO_DIR, DEFAULT_UNDO_SIZE_BYTES, MIN_UNDO_SIZE_BYTES};
pub use wan::{
    Compression, DEFAULT_COMPRESSION_LEVEL, MAX_COMPRESSION_LEVEL, MIN_COMPRESSION_LEVEL,
    MIN_REPLICATION_RATE_BYTES_PER_SEC,
};
pub use wan::{CongestionPolicy, DEFAULT_CONGESTION_FILL_BYTES, MIN_CONGESTION_FILL_BYTES};

/// Default bitmap granularity: one bit per 4 KiB.
pub const DEFAULT_BITMAP_GRANULARITY: u64 = 4096;
/// Smallest allowed bitmap granularity.
pub const MIN_BITMAP_GRANULARITY: u64 = 4096;
/// Largest allowed bitmap granularity.
pub const MAX_BITMAP_GRANULARITY: u64 = 1 << 20;
/// Default protocol A send buffer.
pub const DEFAULT_SEND_BUFFER_BYTES: u64 = 64 << 20;
/// Smallest allowed send buffer.
pub const MIN_SEND_BUFFER_BYTES: u64 = 64 << 10;
/// Largest allowed send buffer.
pub const MAX_SEND_BUFFER_BYTES: u64 = 4 << 30;
/// Default activity-log size in extents (DRBD's `al-extents` default).
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
/// Shortest `shared-secret`, in bytes.
pub const MIN_SHARED_SECRET_BYTES: usize = 16;
/// `oom-score-adj` when absent: blockd is in its clients' I/O path.
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -1000;
/// `worker-threads` of a standalone export when absent: one thread runs its NBD
/// connections (the disk engine has threads of its own); a second one costs more in
/// thread hand-offs than it gains (measured: ARCHITECTURE, "Threads").
pub const DEFAULT_WORKER_THREADS_STANDALONE: usize = 1;
/// `worker-threads` of a replicated node when absent: the peer link's reader and
/// writer (each with a crc over up to 32 MiB) and the NBD side can run at once.
pub const DEFAULT_WORKER_THREADS_REPLICATED: usize = 2;
/// Most `worker-threads`.
pub const MAX_WORKER_THREADS: usize = 256;
/// Fewest activity-log extents: a smaller log would write its slot on almost every
/// write that touches a new region.
pub const MIN_AL_EXTENTS: u32 = 16;
/// Most activity-log extents: what one on-disk AL slot holds
/// ([`crate::meta::MAX_AL_EXTENTS`] is this value).
pub const MAX_AL_EXTENTS_CONFIG: u32 = 8000;
/// Default `resync-min-rate`.
pub const DEFAULT_RESYNC_MIN_RATE_BYTES_PER_SEC: u64 = 8 << 20;
/// Lowest `resync-rate` and `resync-min-rate`: slower would take days for a
/// terabyte and is more likely a unit mistake than an intent.
pub const MIN_RESYNC_RATE_BYTES_PER_SEC: u64 = 1 << 20;
/// Directory of the default control sockets.
pub const DEFAULT_CONTROL_DIR: &str = "/run/blockd";

/// A validated resource config file.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from (as given; used in messages).
    pub path: PathBuf,
    /// `[resource]`.
    pub resource: ResourceConfig,
    /// The `[[node]]` tables, in file order; at least one, names unique.
    pub nodes: Vec<NodeConfig>,
}

/// `[resource]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceConfig {
    /// Resource name, e.g. `r0`; also the NBD export name.
    pub name: String,
    /// Replication protocol; default [`Protocol::C`].
    pub protocol: Protocol,
    /// Exported size in bytes; `None`: the smallest backing store.
    pub size_bytes: Option<u64>,
    /// Bytes per dirty-bitmap bit: a power of two from 4 KiB to 1 MiB; default 4 KiB.
    pub bitmap_granularity_bytes: u64,
    /// Protocol A: bytes of replication frames queued but not yet sent beyond which
    /// writes wait for their acknowledgement (SPEC §9 bounded send buffer).
    pub send_buffer_bytes: u64,
    /// Activity-log size: how many 4 MiB extents may be hot (written to without the
    /// bitmap being updated first); [`MIN_AL_EXTENTS`]..=[`MAX_AL_EXTENTS_CONFIG`].
    pub al_extents: u32,
    /// How fast a resync may copy; default [`ResyncRate::Auto`].
    pub resync_rate: ResyncRate,
    /// Auto mode: the resync rate kept while application I/O is active.
    pub resync_min_rate_bytes_per_sec: u64,
    /// Checksum-based resync: the target sends per-granule digests and the source
    /// sends only granules that differ.
    pub resync_checksum: bool,
    /// `shared-secret`: peers prove they know it (HMAC-SHA256 challenge at connect)
    /// before anything they send is used.
    pub shared_secret: Option<SharedSecret>,
    /// `allow-unauthenticated-peers`: run without `shared-secret` although a node's
    /// replication address is not loopback.
    pub allow_unauthenticated_peers: bool,
    /// `tls-ca`: mutual TLS 1.3 on the peer link; every peer's certificate must
    /// chain to this CA and name the peer (module docs, "TLS").
    pub tls_ca: Option<PathBuf>,
    /// `on-io-error`: what an I/O error on a node's own disk does.
    pub on_io_error: IoErrorPolicy,
    /// `ack-timeout`: a peer that leaves a replicated write, barrier, flush or
    /// read unanswered this long after it was sent is disconnected.
    pub ack_timeout_ms: u64,
    /// `on-congestion` (protocol A): block writers, or pull ahead of the peer.
    pub on_congestion: CongestionPolicy,
    /// `congestion-fill`: bytes queued for the peer beyond which the policy acts.
    pub congestion_fill_bytes: u64,
    /// `undo-size`: the most bytes a catching-up target's undo journal may hold
    /// ([`crate::undo`]); 0: no journal, a catch-up overwrites in place (DRBD's way)
    /// and the target has no consistent image until it completes.
    pub undo_size_bytes: u64,
    /// `compression`: compress the data of `Write` and resync frames on the peer link
    /// (used only when the peer says the same in its Hello).
    pub compression: Compression,
    /// `compression-level`: the zstd level this node compresses at,
    /// [`MIN_COMPRESSION_LEVEL`]..=[`MAX_COMPRESSION_LEVEL`].
    pub compression_level: i32,
    /// `replication-rate`: bytes per second (on the wire) at most for the frames of
    /// application writes; protocols A and B only. `None`: unlimited.
    pub replication_rate_bytes_per_sec: Option<u64>,
}

/// The peers' shared secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedSecret(String);

impl SharedSecret {
    pub fn new(secret: String) -> SharedSecret {
        SharedSecret(secret)
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(<hidden>)")
    }
}

/// `resync-rate`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResyncRate {
    /// As fast as the disks and link allow while the device is idle, falling back to
    /// `resync-min-rate` while applications write.
    #[default]
    Auto,
    /// A fixed ceiling.
    Fixed { bytes_per_sec: u64 },
}

/// Replication protocol (SPEC §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Asynchronous: a write completes once it is on the local disk and in the send
    /// buffer.
    A,
    /// Semi-synchronous: ... and the peer has received it.
    B,
    /// Synchronous: ... and the peer has it on its disk.
    #[default]
    C,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        })
    }
}

/// One `[[node]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name; matched against the host name when `--node` is not given.
    pub name: String,
    /// Where peers reach this node.
    pub replication: HostPort,
    /// Where this node exports the device while Primary; never empty.
    pub nbd: Vec<ListenAddr>,
    /// Backing store: a block device or a regular file (absolute path).
    pub disk: PathBuf,
    /// Where the metadata lives.
    pub meta: MetaLocation,
    /// Control socket path; default `/run/blockd/<resource>-<node>.sock`.
    pub control: PathBuf,
    /// A group whose members may use the control socket too (mode 0660); `None`:
    /// root only (0600).
    pub control_group: Option<String>,
    /// Where the Prometheus text endpoint listens (`GET /metrics`); `None`: off.
    pub metrics: Option<HostPort>,
    /// Commands run on replication events (DRBD's handlers).
    pub handlers: Handlers,
    /// `mlock`: lock all of blockd's memory (`mlockall`), so serving a kernel NBD
    /// client on the same host never waits on paging. Default off.
    pub mlock: bool,
    /// `oom-score-adj`: written to `/proc/self/oom_score_adj` at start; default
    /// -1000 (never chosen by the OOM killer: a killed blockd stalls every client).
    pub oom_score_adj: i32,
    /// `tls-cert` / `tls-key`: this node's certificate on the peer link; present
    /// exactly when `resource.tls-ca` is set.
    pub tls: Option<TlsFiles>,
    /// `nbd-tls` and its files: TLS for NBD clients.
    pub nbd_tls: NbdTls,
    /// `undo-dir`: where this node keeps undo journals
    /// ([`crate::undo::catchup_path`], [`crate::undo::discarded_path`]); default
    /// [`DEFAULT_UNDO_DIR`].
    pub undo_dir: PathBuf,
    /// `worker-threads`: threads of the async runtime that runs this node's tasks;
    /// `None`: the default ([`Config::worker_threads`]).
    pub worker_threads: Option<usize>,
    /// Where the keys were written, so that checks made later against the machine
    /// ([`Config::check_local`]) can point at the line like parse errors do.
    pub lines: NodeLines,
}

/// 1-based lines of a node's keys in its file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLines {
    /// The `disk` key.
    pub disk: usize,
    /// The `meta` key.
    pub meta: usize,
}

/// Commands (`/bin/sh -c`) blockd runs on replication events, with the environment
/// `BLOCKD_RESOURCE`, `BLOCKD_NODE` and `BLOCKD_PEER`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handlers {
    /// `fence-peer`: a Primary (protocol C) lost its peer; write acks are held until
    /// it returns (exit 3, 4, 5 or 7: fenced), bounded by a timeout.
    pub fence_peer: Option<String>,
    /// `after-resync-target`: this node finished a resync as target (e.g. removes
    /// the fencing constraint against it).
    pub after_resync_target: Option<String>,
}

/// A TCP endpoint as written: the host is an IPv4 address, an IPv6 address (stored
/// without brackets) or a DNS name (not resolved here).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host without brackets.
    pub host: String,
    /// Port, 1..=65535.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Resolves the host (blocking, for DNS names) like `(host, port)` does.
impl ToSocketAddrs for HostPort {
    type Iter = std::vec::IntoIter<SocketAddr>;
    fn to_socket_addrs(&self) -> std::io::Result<Self::Iter> {
        (self.host.as_str(), self.port).to_socket_addrs()
    }
}

/// Where a server listens: TCP or a Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `host:port`.
    Tcp(HostPort),
    /// `unix:/path` (absolute path).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(hp) => hp.fmt(f),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `meta`: where the metadata (superblock, bitmap) lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing store.
    Internal,
    /// In a separate file or device (absolute path).
    External(PathBuf),
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|io| ConfigError::Read { path: path.to_owned(), io })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in messages and stored in
    /// [`Config::path`].
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        validate::parse(text, path)
    }

    /// The node named `name`, if any.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The local node: the one named `name` (`--node`), or else the one whose name is
    /// this host's name (`gethostname`; if that is a dotted name matching no node, its
    /// first label).
    pub fn local_node(&self, name: Option<&str>) -> Result<&NodeConfig, ConfigError> {
        match name {
            Some(name) => self.node(name).ok_or_else(|| ConfigError::NoSuchNode {
                path: self.path.clone(),
                name: name.to_owned(),
                nodes: self.node_names(),
            }),
            None => {
                let host = nix::unistd::gethostname()
                    .map_err(|e| ConfigError::Hostname { path: self.path.clone(), io: e.into() })?;
                self.node_for_host(&host.to_string_lossy())
            }
        }
    }

    /// [`Config::local_node`] without `--node`, for a given host name.
    pub(crate) fn node_for_host(&self, host: &str) -> Result<&NodeConfig, ConfigError> {
        self.node(host)
            .or_else(|| {
                let short = host.split_once('.')?.0;
                self.node(short)
            })
            .ok_or_else(|| ConfigError::NoHostMatch {
                path: self.path.clone(),
                hostname: host.to_owned(),
                nodes: self.node_names(),
            })
    }

    /// What node `local` needs for TLS on the peer link; `None` when TLS is off (no
    /// `tls-ca`) or `local` is not a node.
    pub fn peer_tls(&self, local: &str) -> Option<PeerTlsFiles> {
        let ca = self.resource.tls_ca.clone()?;
        let own = self.node(local)?.tls.clone()?;
        Some(PeerTlsFiles { ca, own })
    }

    /// The async runtime threads of `node`: its `worker-threads`, else one for a
    /// standalone export and two for a replicated node.
    pub fn worker_threads(&self, node: &NodeConfig) -> usize {
        node.worker_threads.unwrap_or(if self.peers(&node.name).next().is_some() {
            DEFAULT_WORKER_THREADS_REPLICATED
        } else {
            DEFAULT_WORKER_THREADS_STANDALONE
        })
    }

    /// All nodes except the one named `local`, in file order.
    pub fn peers(&self, local: &str) -> impl Iterator<Item = &NodeConfig> {
        self.nodes.iter().filter(move |n| n.name != local)
    }

    fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }
}

impl Config {
    /// The effective config as TOML: every key with its value after defaults (sizes
    /// in bytes), in file order. `blockctl show` prints it; parsing it again yields
    /// the same config.
    pub fn effective_toml(&self) -> String {
        use std::fmt::Write as _;
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let mut out = String::new();
        let r = &self.resource;
        let _ = writeln!(out, "[resource]\nname = {}\nprotocol = {}", q(&r.name), q(&r.protocol.to_string()));
        if let Some(size) = r.size_bytes {
            let _ = writeln!(out, "size = {size}");
        }
        let _ = writeln!(out, "bitmap-granularity = {}", r.bitmap_granularity_bytes);
        let _ = writeln!(out, "send-buffer = {}", r.send_buffer_bytes);
        let _ = writeln!(out, "al-extents = {}", r.al_extents);
        match r.resync_rate {
            ResyncRate::Auto => {
                let _ = writeln!(out, "resync-rate = {}", q("auto"));
            }
            ResyncRate::Fixed { bytes_per_sec } => {
                let _ = writeln!(out, "resync-rate = {bytes_per_sec}");
            }
        }
        let _ = writeln!(out, "resync-min-rate = {}", r.resync_min_rate_bytes_per_sec);
        let _ = writeln!(out, "resync-checksum = {}", r.resync_checksum);
        if r.shared_secret.is_some() {
            // Never printed; `show` output may end up in tickets and logs.
            let _ = writeln!(out, "# shared-secret: set (not shown)");
        }
        if r.allow_unauthenticated_peers {
            let _ = writeln!(out, "allow-unauthenticated-peers = true");
        }
        if let Some(ca) = &r.tls_ca {
            let _ = writeln!(out, "tls-ca = {}", q(&ca.display().to_string()));
        }
        let _ = writeln!(out, "on-io-error = {}", q(&r.on_io_error.to_string()));
        let _ = writeln!(out, "ack-timeout = {}", q(&format!("{}ms", r.ack_timeout_ms)));
        let _ = writeln!(out, "on-congestion = {}", q(&r.on_congestion.to_string()));
        let _ = writeln!(out, "congestion-fill = {}", r.congestion_fill_bytes);
        let _ = writeln!(out, "undo-size = {}", r.undo_size_bytes);
        let _ = writeln!(out, "compression = {}", q(&r.compression.to_string()));
        let _ = writeln!(out, "compression-level = {}", r.compression_level);
        if let Some(rate) = r.replication_rate_bytes_per_sec {
            let _ = writeln!(out, "replication-rate = {rate}");
        }
        for n in &self.nodes {
            let nbd: Vec<String> = n.nbd.iter().map(|a| q(&a.to_string())).collect();
            let meta = match &n.meta {
                MetaLocation::Internal => q("internal"),
                MetaLocation::External(p) => q(&p.display().to_string()),
            };
            let _ = writeln!(
                out,
                "\n[[node]]\nname = {}\nreplication = {}\nnbd = [{}]\ndisk = {}\nmeta = {}\ncontrol = {}",
                q(&n.name),
                q(&n.replication.to_string()),
                nbd.join(", "),
                q(&n.disk.display().to_string()),
                meta,
                q(&n.control.display().to_string()),
            );
            if let Some(group) = &n.control_group {
                let _ = writeln!(out, "control-group = {}", q(group));
            }
            if let Some(metrics) = &n.metrics {
                let _ = writeln!(out, "metrics = {}", q(&metrics.to_string()));
            }
            if let Some(cmd) = &n.handlers.fence_peer {
                let _ = writeln!(out, "fence-peer = {}", q(cmd));
            }
            if let Some(cmd) = &n.handlers.after_resync_target {
                let _ = writeln!(out, "after-resync-target = {}", q(cmd));
            }
            let _ = writeln!(out, "mlock = {}\noom-score-adj = {}", n.mlock, n.oom_score_adj);
            let path = |p: &Path| q(&p.display().to_string());
            if let Some(t) = &n.tls {
                let _ = writeln!(out, "tls-cert = {}\ntls-key = {}", path(&t.cert), path(&t.key));
            }
            let _ = writeln!(out, "nbd-tls = {}", q(&n.nbd_tls.mode.to_string()));
            if let Some(t) = &n.nbd_tls.files {
                let _ = writeln!(out, "nbd-tls-cert = {}\nnbd-tls-key = {}", path(&t.cert), path(&t.key));
            }
            if let Some(ca) = &n.nbd_tls.client_ca {
                let _ = writeln!(out, "nbd-tls-ca = {}", path(ca));
            }
            let _ = writeln!(out, "undo-dir = {}", path(&n.undo_dir));
            if let Some(threads) = n.worker_threads {
                let _ = writeln!(out, "worker-threads = {threads}");
            }
        }
        out
    }
}
