//! The server under test: blockd (with a chosen I/O engine) or nbdkit as a
//! reference, behind one fixture type.

use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::daemon::{Addr, Daemon, free_port};
use crate::tmp::{TempDir, sparse_file};
use crate::tools::require;

pub const MIB: u64 = 1 << 20;
/// Export (resource) name.
pub const EXPORT: &str = "r0";
/// The standalone node's name.
pub const NODE: &str = "alpha";

/// blockd's `--io-engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Posix,
    Uring,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Posix => "posix",
            Engine::Uring => "uring",
        }
    }
}

/// Which server a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// nbdkit's file plugin: the reference used to validate the suite.
    Nbdkit,
    /// `blockd run --io-engine ENGINE`.
    Blockd(Engine),
}

impl ServerKind {
    /// blockd with `engine`, or nbdkit when `BLOCKD_TEST_SERVER=nbdkit`.
    pub fn for_engine(engine: Engine) -> ServerKind {
        if nbdkit_selected() { ServerKind::Nbdkit } else { ServerKind::Blockd(engine) }
    }

    pub fn is_nbdkit(self) -> bool {
        self == ServerKind::Nbdkit
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerKind::Nbdkit => write!(f, "nbdkit"),
            ServerKind::Blockd(e) => write!(f, "blockd-{}", e.as_str()),
        }
    }
}

/// `BLOCKD_TEST_SERVER`: unset/empty/`blockd` → blockd, `nbdkit` → nbdkit.
pub fn nbdkit_selected() -> bool {
    match std::env::var("BLOCKD_TEST_SERVER").as_deref() {
        Ok("nbdkit") => true,
        Ok("blockd") | Ok("") | Err(_) => false,
        Ok(other) => panic!("BLOCKD_TEST_SERVER={other:?}: expected \"nbdkit\" or \"blockd\""),
    }
}

/// The workspace root (`tests/..`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// `$BLOCKD_BIN`, else `<workspace>/target/release/blockd`, else
/// `<workspace>/target/debug/blockd`.
pub fn blockd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BLOCKD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "BLOCKD_BIN={} does not exist", p.display());
        return p;
    }
    let root = workspace_root();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("blockd");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "blockd binary not found (BLOCKD_BIN unset, no {}/target/{{release,debug}}/blockd): \
         build it first: cargo build --release",
        root.display()
    );
}

/// Which listener a URI should use. blockd always listens on both; nbdkit
/// can listen on only one, chosen by this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// Per-test server options.
#[derive(Debug, Clone)]
pub struct Opts {
    pub size: u64,
    pub transport: Transport,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { size: 64 * MIB, transport: Transport::Unix }
    }
}

impl Opts {
    pub fn new() -> Opts {
        Opts::default()
    }
    pub fn size(mut self, size: u64) -> Opts {
        self.size = size;
        self
    }
    pub fn tcp(mut self) -> Opts {
        self.transport = Transport::Tcp;
        self
    }
}

/// A running server on a fresh sparse disk in its own temp dir.
///
/// Field order is drop order: the daemon dies before its directory goes.
#[derive(Debug)]
pub struct Server {
    pub daemon: Daemon,
    pub kind: ServerKind,
    pub opts: Opts,
    pub disk: PathBuf,
    pub unix: Option<PathBuf>,
    pub tcp: Option<SocketAddr>,
    pub config: Option<PathBuf>,
    pub dir: TempDir,
}

/// The blockd config for a standalone node (SPEC §8.1).
pub fn blockd_config(dir: &Path, disk: &Path, tcp: SocketAddr, unix: &Path) -> String {
    format!(
        "[resource]\n\
         name = \"{EXPORT}\"\n\
         \n\
         [[node]]\n\
         name = \"{NODE}\"\n\
         replication = \"127.0.0.1:{repl}\"\n\
         nbd = [\"{tcp}\", \"unix:{unix}\"]\n\
         disk = \"{disk}\"\n\
         meta = \"internal\"\n\
         control = \"{ctl}\"\n",
        repl = free_port(),
        unix = unix.display(),
        disk = disk.display(),
        ctl = dir.join("alpha.ctl").display(),
    )
}

impl Server {
    /// Creates a temp dir and a sparse disk of `opts.size`, starts the
    /// server and waits until it answers.
    pub fn start(kind: ServerKind, label: &str, opts: Opts) -> Server {
        let dir = TempDir::new(&format!("{label}-{kind}"));
        let disk = dir.join("alpha.img");
        sparse_file(&disk, opts.size);
        let log = dir.join("server.log");
        match kind {
            ServerKind::Blockd(engine) => {
                let bin = blockd_bin();
                let unix = dir.join("nbd.sock");
                let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
                let config = dir.join("r0.toml");
                fs::write(&config, blockd_config(dir.path(), &disk, tcp, &unix)).expect("write config");
                let args = vec![
                    "run".to_string(),
                    "--config".to_string(),
                    config.display().to_string(),
                    "--node".to_string(),
                    NODE.to_string(),
                    "--io-engine".to_string(),
                    engine.as_str().to_string(),
                ];
                let addrs = vec![Addr::Tcp(tcp), Addr::Unix(unix.clone())];
                let daemon = Daemon::start(&kind.to_string(), &bin, args, log, addrs, vec![]);
                Server {
                    daemon,
                    kind,
                    opts,
                    disk,
                    unix: Some(unix),
                    tcp: Some(tcp),
                    config: Some(config),
                    dir,
                }
            }
            ServerKind::Nbdkit => {
                let bin = require("nbdkit");
                let mut args: Vec<String> = vec!["--exit-with-parent".into(), "-f".into()];
                let (unix, tcp, addr) = match opts.transport {
                    Transport::Unix => {
                        let p = dir.join("nbd.sock");
                        args.push("-U".into());
                        args.push(p.display().to_string());
                        (Some(p.clone()), None, Addr::Unix(p))
                    }
                    Transport::Tcp => {
                        let a: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
                        args.extend(["-i".into(), "127.0.0.1".into(), "-p".into(), a.port().to_string()]);
                        (None, Some(a), Addr::Tcp(a))
                    }
                };
                // Make nbdkit present what blockd is specified to present:
                // export "r0" (and "" as its alias, unknown names refused),
                // SEND_FAST_ZERO (the file plugin does not advertise it for
                // regular files), block sizes 1 / 4096 / 32 MiB.
                args.extend(
                    ["--filter=exportname", "--filter=nozero", "--filter=blocksize-policy", "file"]
                        .map(String::from),
                );
                args.push(disk.display().to_string());
                args.extend(
                    [
                        "exportname=r0",
                        "exportname=",
                        "default-export=r0",
                        "exportname-list=explicit",
                        "exportname-strict=true",
                        "zeromode=plugin",
                        "fastzeromode=ignore",
                        "blocksize-minimum=1",
                        "blocksize-preferred=4096",
                        "blocksize-maximum=33554432",
                    ]
                    .map(String::from),
                );
                let stale = unix.iter().cloned().collect();
                let daemon = Daemon::start("nbdkit", &bin, args, log, vec![addr], stale);
                Server { daemon, kind, opts, disk, unix, tcp, config: None, dir }
            }
        }
    }

    /// The address of the configured transport.
    pub fn addr(&self) -> Addr {
        match self.opts.transport {
            Transport::Unix => self.unix_addr(),
            Transport::Tcp => self.tcp_addr(),
        }
    }

    pub fn unix_addr(&self) -> Addr {
        Addr::Unix(
            self.unix.clone().unwrap_or_else(|| panic!("{} is not listening on a unix socket", self.kind)),
        )
    }

    pub fn tcp_addr(&self) -> Addr {
        Addr::Tcp(self.tcp.unwrap_or_else(|| panic!("{} is not listening on TCP", self.kind)))
    }

    /// URI of export `r0` on the configured transport.
    pub fn uri(&self) -> String {
        self.addr().uri(EXPORT)
    }

    /// URI with an explicit export name ("" for the default export).
    pub fn uri_export(&self, export: &str) -> String {
        self.addr().uri(export)
    }

    /// The size the export must have.
    pub fn size(&self) -> u64 {
        self.opts.size
    }

    /// A temp-dir path for test files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Generates one `#[test]` per I/O engine: `posix::NAME` and `uring::NAME`.
/// The body gets `$srv: Server`, started with `Opts::default()` or the
/// given options expression.
///
/// ```text
/// engine_tests! {
///     fn nbdinfo_sees_flags(srv) { ... }
///     fn big_disk(srv = Opts::new().size(256 * MIB)) { ... }
/// }
/// ```
#[macro_export]
macro_rules! engine_tests {
    ($($(#[$meta:meta])* fn $name:ident ( $srv:ident $(= $opts:expr)? ) $body:block)*) => {
        $(
            #[allow(unused_mut, unused_variables)]
            fn $name($srv: $crate::Server) $body
        )*
        $crate::engine_tests!(@mod posix Posix $($(#[$meta])* $name ( $($opts)? ))*);
        $crate::engine_tests!(@mod uring Uring $($(#[$meta])* $name ( $($opts)? ))*);
    };
    (@mod $m:ident $engine:ident $($(#[$meta:meta])* $name:ident ( $($opts:expr)? ))*) => {
        mod $m {
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    #[allow(unused_imports)]
                    use super::*;
                    let kind = $crate::ServerKind::for_engine($crate::Engine::$engine);
                    let opts: $crate::Opts = $crate::engine_tests!(@opts $($opts)?);
                    let srv = $crate::Server::start(kind, stringify!($name), opts);
                    super::$name(srv);
                }
            )*
        }
    };
    (@opts) => { $crate::Opts::default() };
    (@opts $opts:expr) => { $opts };
}
