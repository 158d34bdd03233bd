//! A replicated pair on this machine: two `blockd` nodes (`alpha`, `beta`) on
//! loopback, each with its own sparse backing file, metadata, control socket and NBD
//! Unix socket, driven through `blockctl` like an operator would.
//!
//! A node's backing store can instead be a [`FaultDisk`] (faults switched while it
//! runs) or a sparse file on a [`SmallFs`] (a thin store that runs out of space),
//! and its metadata an external file beside the pair's config, so that data faults
//! do not hit it ([`PairOpts::disks`], [`PairOpts::external_meta`]).

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{Addr, Daemon, free_port};
use crate::faultdisk::{FaultDisk, FaultOpts};
use crate::server::{EXPORT, Engine, workspace_root};
use crate::smallfs::{SmallFs, SmallFsKind};
use crate::tmp::{TempDir, sparse_file};
use crate::tools::{Output, run_capture};

/// Bound on one [`Pair::socket_status`] exchange.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The two node names; `alpha` sorts first, so it is the one that dials.
pub const NODES: [&str; 2] = ["alpha", "beta"];

/// How a pair is set up.
#[derive(Clone, Debug)]
pub struct PairOpts {
    pub protocol: char,
    /// Size of each backing file (metadata takes a little at its end).
    pub disk_bytes: u64,
    /// Run `create-md --clear-bitmap` (identical empty disks: no initial sync).
    pub clear_bitmap: bool,
    /// Each node's `replication` address (`host:port`, where it listens and where
    /// the peer dials). `None`: 127.0.0.1 with a free port each.
    pub replication: Option<[String; 2]>,
    /// A command each node's `blockd run` is started under, e.g.
    /// `ip netns exec NS`. It must exec blockd (not fork), so that the PID the
    /// harness supervises is blockd's. Empty: blockd is started directly.
    pub prefix: [Vec<String>; 2],
    /// Raw TOML lines appended to the `[resource]` table, e.g.
    /// `"al-extents = 32\nresync-rate = \"16MiB\"\n"`. Written before `create-md`.
    pub extra_resource: String,
    /// Raw TOML lines appended to each node's `[[node]]` table (e.g. `metrics = …`).
    pub extra_node: [String; 2],
    /// Each node's backing store (default: a plain sparse file).
    pub disks: [DiskSpec; 2],
    /// Both nodes' `meta`: false = `"internal"` (the end of the backing store, so
    /// behind the same faults); true = the file `DIR/NAME.md` on the pair's own
    /// filesystem, so a [`FaultDisk`] fails only data I/O. One setting for both:
    /// internal metadata takes space off the device, and the peers' device sizes
    /// must match.
    pub external_meta: bool,
    /// `blockd run --io-engine`; None: the daemon's default (`auto`).
    pub io_engine: Option<Engine>,
}

/// What a node's backing store is (`disk_bytes` long in every case).
#[derive(Clone, Debug, Default)]
pub enum DiskSpec {
    /// A sparse file `DIR/NAME.img`.
    #[default]
    Plain,
    /// A [`FaultDisk`] over the store `DIR/NAME.store`; the node opens its FUSE file.
    Fault(FaultOpts),
    /// A sparse file `NAME.img` on a [`SmallFs`] of `fs_bytes` mounted at
    /// `DIR/NAME.fs` (make it smaller than `disk_bytes` for a thin store).
    SmallFs { kind: SmallFsKind, fs_bytes: u64 },
}

/// The thing behind a node's backing store, owned by the [`Pair`].
#[derive(Debug)]
pub enum Backing {
    Plain,
    Fault(Box<FaultDisk>),
    SmallFs(SmallFs),
}

impl Default for PairOpts {
    fn default() -> Self {
        PairOpts {
            protocol: 'C',
            disk_bytes: 64 << 20,
            clear_bitmap: true,
            replication: None,
            prefix: [Vec::new(), Vec::new()],
            extra_resource: String::new(),
            extra_node: [String::new(), String::new()],
            disks: [DiskSpec::Plain, DiskSpec::Plain],
            external_meta: false,
            io_engine: None,
        }
    }
}

/// One node's files and process.
pub struct Node {
    pub name: &'static str,
    /// The config's `replication` address (`host:port`).
    pub replication: String,
    /// The config's `disk` (for a [`FaultDisk`], its FUSE file).
    pub disk: PathBuf,
    /// The file holding the data, read without faults (for a [`FaultDisk`] its
    /// store; otherwise `disk`).
    pub store: PathBuf,
    /// The config's `meta` when external.
    pub meta: Option<PathBuf>,
    pub control: PathBuf,
    pub nbd: PathBuf,
    pub daemon: Option<Daemon>,
    /// This node's own config file, when a test gives it one that differs from
    /// the pair's (e.g. another `shared-secret`).
    pub config: Option<PathBuf>,
}

/// Two nodes of resource `r0`.
pub struct Pair {
    /// Declared before `dir`: fields drop in order, so the nodes are killed (and
    /// a failing test prints their logs) before the directory is removed.
    pub nodes: [Node; 2],
    /// After the nodes (which hold them open), before the directory.
    pub backing: [Backing; 2],
    pub dir: TempDir,
    pub config: PathBuf,
    /// See [`PairOpts::prefix`].
    pub prefix: [Vec<String>; 2],
    /// See [`PairOpts::io_engine`].
    pub io_engine: Option<Engine>,
}

/// Where `blockd` / `blockctl` are looked up, first match wins:
/// 1. `$BLOCKD_TARGET_DIR/{release,debug}/NAME` (a cargo target dir; when set, it
///    is the only place looked at);
/// 2. the target dir this test binary was built into (`.../PROFILE/deps/TEST`
///    → `.../PROFILE/NAME`), so a `CARGO_TARGET_DIR` used for both
///    `cargo build --release` and `cargo test --release` just works;
/// 3. `<workspace>/target/{release,debug}/NAME`.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("BLOCKD_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        for profile in ["release", "debug"] {
            let p = dir.join(profile).join(name);
            if p.is_file() {
                return p;
            }
        }
        panic!("BLOCKD_TARGET_DIR={}: no {{release,debug}}/{name} there", dir.display());
    }
    let own = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.parent().filter(|d| d.ends_with("deps")).and_then(Path::parent).map(|d| d.join(name))
        })
        .filter(|p| p.is_file());
    if let Some(p) = own {
        return p;
    }
    let root = workspace_root();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} binary not found (BLOCKD_TARGET_DIR unset, not next to the test binary, not under \
         {}/target): build it first: cargo build --release",
        root.display()
    );
}

impl Pair {
    /// Writes the config and creates both nodes' metadata (nodes not started).
    pub fn create(label: &str, opts: &PairOpts) -> Pair {
        let dir = TempDir::new(label);
        let replication = opts
            .replication
            .clone()
            .unwrap_or_else(|| [free_port(), free_port()].map(|port| format!("127.0.0.1:{port}")));
        let mut text = format!("[resource]\nname = \"{EXPORT}\"\nprotocol = \"{}\"\n", opts.protocol);
        if opts.replication.is_some() && !opts.extra_resource.contains("shared-secret") {
            // Off loopback (namespaces), peers must authenticate (SPEC §6).
            text.push_str("shared-secret = \"blockd test pair secret 0123456789\"\n");
        }
        text.push_str(&opts.extra_resource);
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let mut replication = replication.into_iter();
        let mut backing = [Backing::Plain, Backing::Plain];
        let nodes = std::array::from_fn(|n| {
            let name = NODES[n];
            let (b, disk, store) = create_disk(&dir, name, &opts.disks[n], opts.disk_bytes);
            backing[n] = b;
            Node {
                name,
                replication: replication.next().expect("two addresses"),
                disk,
                store,
                meta: opts.external_meta.then(|| dir.join(&format!("{name}.md"))),
                control: dir.join(&format!("{name}.ctl")),
                nbd: dir.join(&format!("{name}.nbd")),
                daemon: None,
                config: None,
            }
        });
        for (node, extra) in nodes.iter().zip(&opts.extra_node) {
            let meta = node.meta.as_ref().map_or("internal".to_string(), |m| m.display().to_string());
            // Both nodes share this host: each keeps its undo journals in its own
            // directory (the default, /var/lib/blockd, would be one file for both).
            let undo_dir = dir.join(&format!("{}-undo", node.name));
            std::fs::create_dir_all(&undo_dir).expect("mkdir undo-dir");
            text.push_str(&format!(
                "\n[[node]]\nname = \"{}\"\nreplication = \"{}\"\nnbd = \"unix:{}\"\n\
                 disk = \"{}\"\nmeta = \"{meta}\"\ncontrol = \"{}\"\nundo-dir = \"{}\"\n",
                node.name,
                node.replication,
                node.nbd.display(),
                node.disk.display(),
                node.control.display(),
                undo_dir.display()
            ));
            text.push_str(extra);
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        let config = dir.join("r0.toml");
        std::fs::write(&config, text).expect("write config");
        let pair =
            Pair { dir, config, nodes, backing, prefix: opts.prefix.clone(), io_engine: opts.io_engine };
        for n in 0..2 {
            let mut args = vec!["create-md"];
            if opts.clear_bitmap {
                args.push("--clear-bitmap");
            }
            pair.ctl_ok(n, &args);
        }
        pair
    }

    /// Creates the pair and starts both nodes.
    pub fn start(label: &str, opts: &PairOpts) -> Pair {
        let mut pair = Pair::create(label, opts);
        pair.start_node(0);
        pair.start_node(1);
        pair
    }

    /// Starts node `n` (as `blockd run` in the foreground, so the test owns its PID).
    pub fn start_node(&mut self, n: usize) {
        let node = &self.nodes[n];
        let mut args = vec![
            "run".to_string(),
            "--config".to_string(),
            self.node_config(n).display().to_string(),
            "--node".to_string(),
            node.name.to_string(),
        ];
        if let Some(engine) = self.io_engine {
            args.extend(["--io-engine".to_string(), engine.as_str().to_string()]);
        }
        let log = self.dir.join(&format!("{}.log", node.name));
        let addrs = vec![Addr::Unix(node.nbd.clone())];
        let blockd = binary("blockd");
        let (program, args) = match self.prefix[n].split_first() {
            Some((program, rest)) => {
                let args = rest.iter().cloned().chain([blockd.display().to_string()]).chain(args).collect();
                (PathBuf::from(program), args)
            }
            None => (blockd, args),
        };
        let daemon = Daemon::start(node.name, &program, args, log, addrs, vec![]);
        self.nodes[n].daemon = Some(daemon);
        self.wait(Duration::from_secs(30), |p| p.try_status(n).is_some(), &format!("{} answers", NODES[n]));
    }

    /// The config file node `n` runs with.
    pub fn node_config(&self, n: usize) -> &Path {
        self.nodes[n].config.as_deref().unwrap_or(&self.config)
    }

    pub fn daemon(&mut self, n: usize) -> &mut Daemon {
        self.nodes[n].daemon.as_mut().expect("node started")
    }

    /// Runs `blockctl --config C --node N ARGS`.
    pub fn ctl(&self, n: usize, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("blockctl"));
        cmd.arg("--config").arg(self.node_config(n)).arg("--node").arg(self.nodes[n].name).args(args);
        run_capture(&mut cmd, Duration::from_secs(120))
    }

    /// `ctl` that must succeed.
    pub fn ctl_ok(&self, n: usize, args: &[&str]) -> Output {
        let out = self.ctl(n, args);
        assert!(
            out.status.success(),
            "blockctl {args:?} on {} failed\n{}",
            self.nodes[n].name,
            out.describe()
        );
        out
    }

    /// `ctl` that must fail with exit code `code` (1: refused, 2: usage or config
    /// error) and say `needle` on stderr.
    pub fn ctl_refused(&self, n: usize, args: &[&str], code: i32, needle: &str) -> Output {
        let out = self.ctl(n, args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "blockctl {args:?} on {}: want exit code {code}\n{}",
            self.nodes[n].name,
            out.describe()
        );
        assert!(
            out.stderr.contains(needle),
            "blockctl {args:?} on {}: stderr does not say {needle:?}\n{}",
            self.nodes[n].name,
            out.describe()
        );
        out
    }

    /// `blockctl events [--json]` on node `n` as a child process, streaming until
    /// the returned [`EventStream`] is stopped or dropped.
    pub fn events(&self, n: usize, json: bool) -> EventStream {
        let mut cmd = Command::new(binary("blockctl"));
        cmd.arg("--config").arg(self.node_config(n)).arg("--node").arg(self.nodes[n].name).arg("events");
        if json {
            cmd.arg("--json");
        }
        let stderr = self.dir.join(&format!("events-{}.err", self.nodes[n].name));
        EventStream::spawn(cmd, stderr)
    }

    /// `status --json` of node `n`, or None when it does not answer (stopped,
    /// restarting).
    pub fn try_status(&self, n: usize) -> Option<Value> {
        let out = self.ctl(n, &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_str(&out.stdout).ok()
    }

    /// `status` of node `n` straight from its control socket (one request line, one
    /// reply line; no `blockctl` process), so both nodes can be sampled every few
    /// milliseconds. None when the node does not answer.
    pub fn socket_status(&self, n: usize) -> Option<Value> {
        let mut s = UnixStream::connect(&self.nodes[n].control).ok()?;
        s.set_read_timeout(Some(SOCKET_TIMEOUT)).ok()?;
        s.set_write_timeout(Some(SOCKET_TIMEOUT)).ok()?;
        let req = serde_json::json!({"v": blockd::control::PROTOCOL_VERSION, "cmd": "status"});
        s.write_all(format!("{req}\n").as_bytes()).ok()?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).ok()?;
        let mut reply: Value = serde_json::from_str(&line).ok()?;
        (reply["ok"] == true).then(|| reply["result"].take())
    }

    /// Node `n` reaches its peer at `addr` (e.g. a [`crate::proxy::Proxy`] in front
    /// of the peer) instead of the peer's `replication` address, where the peer still
    /// listens. Only the dialing node (alpha, [`NODES`]`[0]`) ever uses it.
    pub fn dial_peer_at(&mut self, n: usize, addr: &str) {
        let line = |a: &str| format!("replication = \"{a}\"\n");
        let old = line(&self.nodes[1 - n].replication);
        self.edit_node_config(n, &old, &line(addr));
    }

    /// Gives node `n` a config of its own: its current one with the line `old`
    /// (which must be there once) replaced by `new`.
    fn edit_node_config(&mut self, n: usize, old: &str, new: &str) {
        let text = std::fs::read_to_string(self.node_config(n)).expect("read config");
        assert_eq!(text.matches(old).count(), 1, "{old:?} is not once in the config:\n{text}");
        let own = self.dir.join(&format!("{}.toml", self.nodes[n].name));
        std::fs::write(&own, text.replacen(old, new, 1)).expect("write node config");
        self.nodes[n].config = Some(own);
    }

    /// `status --json` of node `n`.
    pub fn status(&self, n: usize) -> Value {
        self.try_status(n).unwrap_or_else(|| panic!("status of {} failed", self.nodes[n].name))
    }

    /// Polls `cond` every 50 ms until it holds or `timeout` passes (then panics with
    /// both nodes' status and log tails).
    pub fn wait(&mut self, timeout: Duration, mut cond: impl FnMut(&mut Pair) -> bool, what: &str) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut report = String::new();
        for n in 0..2 {
            let status = self.try_status(n).map_or("(no answer)".to_string(), |s| s.to_string());
            let log = self.nodes[n].daemon.as_ref().map_or(String::new(), |d| d.log_tail(30));
            report.push_str(&format!("--- {} status: {status}\n--- log:\n{log}\n", self.nodes[n].name));
        }
        panic!("timed out after {timeout:?} waiting for: {what}\n{report}");
    }

    /// Waits until both nodes report the peer connected and replicating.
    pub fn wait_established(&mut self) {
        self.wait(
            Duration::from_secs(30),
            |p| {
                (0..2).all(|n| p.try_status(n).is_some_and(|s| s["peers"][0]["replication"] == "Established"))
            },
            "both nodes Established",
        );
    }

    /// `peers[0]` of node `n`'s `status --json` (Null when it does not answer).
    pub fn peer(&self, n: usize) -> Value {
        self.try_status(n).map_or(Value::Null, |s| s["peers"][0].clone())
    }

    /// `peers[0][key]` of node `n` as a number (panics, showing the status, if absent).
    pub fn peer_u64(&self, n: usize, key: &str) -> u64 {
        let s = self.status(n);
        s["peers"][0][key]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no numeric peers[0].{key} in {s}", NODES[n]))
    }

    /// The export size, from an NBD handshake with node `n` (a Primary).
    pub fn export_size(&self, n: usize) -> u64 {
        let addr = crate::daemon::Addr::Unix(self.nodes[n].nbd.clone());
        let (_c, size, _) = crate::raw::RawClient::handshake(&addr, EXPORT, false);
        size
    }

    /// Both nodes Connected and Established (not resyncing), both disks
    /// UpToDate as seen by either side, and nothing out of sync on either.
    pub fn is_synced(&self) -> bool {
        (0..2).all(|n| {
            self.try_status(n).is_some_and(|s| {
                let p = &s["peers"][0];
                s["disk"] == "UpToDate"
                    && p["connection"] == "Connected"
                    && p["replication"] == "Established"
                    && p["disk"] == "UpToDate"
                    && p["out_of_sync_bytes"] == 0
            })
        })
    }

    /// Waits (bounded by `timeout`) until [`Pair::is_synced`].
    pub fn wait_synced(&mut self, timeout: Duration) {
        self.wait(timeout, |p| p.is_synced(), "both nodes Connected, Established, UpToDate, 0 out of sync");
    }

    /// The NBD URI of node `n`.
    pub fn uri(&self, n: usize) -> String {
        Addr::Unix(self.nodes[n].nbd.clone()).uri(EXPORT)
    }

    /// Stops node `n` cleanly (SIGTERM), asserting exit status 0.
    pub fn stop_node(&mut self, n: usize) {
        if let Some(mut d) = self.nodes[n].daemon.take() {
            d.stop_ok();
        }
    }

    /// The first `len` bytes of node `n`'s backing file.
    pub fn disk_bytes(&self, n: usize, len: u64) -> Vec<u8> {
        let mut data = std::fs::read(&self.nodes[n].disk).expect("read disk");
        data.truncate(len as usize);
        data
    }

    pub fn disk_path(&self, n: usize) -> &Path {
        &self.nodes[n].disk
    }

    /// The file holding node `n`'s data, read without faults (see [`Node::store`]).
    pub fn store_path(&self, n: usize) -> &Path {
        &self.nodes[n].store
    }

    /// Node `n`'s [`FaultDisk`] (panics unless it has one).
    pub fn fault(&self, n: usize) -> &FaultDisk {
        match &self.backing[n] {
            Backing::Fault(d) => d,
            other => panic!("{} has no fault disk ({other:?})", NODES[n]),
        }
    }

    /// The [`SmallFs`] node `n`'s disk lives on (panics unless it has one).
    pub fn small_fs(&self, n: usize) -> &SmallFs {
        match &self.backing[n] {
            Backing::SmallFs(fs) => fs,
            other => panic!("{} has no small filesystem ({other:?})", NODES[n]),
        }
    }
}

impl Drop for Pair {
    /// Before the fields drop (the nodes are killed first): a node with a request
    /// held by a paused [`FaultDisk`] can be killed but not reaped until the
    /// request completes, so paused disks are resumed first (a failing test would
    /// hang in its cleanup otherwise).
    fn drop(&mut self) {
        for backing in &self.backing {
            if let Backing::Fault(disk) = backing {
                disk.resume_if_paused();
            }
        }
    }
}

/// Creates node `name`'s backing store of `bytes` in `dir`: what backs it, the
/// config's `disk`, and the file holding the data.
fn create_disk(dir: &TempDir, name: &str, spec: &DiskSpec, bytes: u64) -> (Backing, PathBuf, PathBuf) {
    match spec {
        DiskSpec::Plain => {
            let disk = dir.join(&format!("{name}.img"));
            sparse_file(&disk, bytes);
            (Backing::Plain, disk.clone(), disk)
        }
        DiskSpec::Fault(opts) => {
            let d = FaultDisk::create(dir.path(), name, bytes, opts);
            let (disk, store) = (d.path().to_path_buf(), d.store().to_path_buf());
            (Backing::Fault(Box::new(d)), disk, store)
        }
        DiskSpec::SmallFs { kind, fs_bytes } => {
            let mountpoint = dir.join(&format!("{name}.fs"));
            let fs = SmallFs::create(*kind, &mountpoint, &dir.join(&format!("{name}.fsimg")), *fs_bytes);
            let disk = fs.join(&format!("{name}.img"));
            sparse_file(&disk, bytes);
            (Backing::SmallFs(fs), disk.clone(), disk)
        }
    }
}

/// A running `blockctl events`: its stdout read line by line on a thread, handed
/// over with deadlines. Killed on [`EventStream::stop`] or drop.
pub struct EventStream {
    child: Child,
    rx: mpsc::Receiver<String>,
    stderr: PathBuf,
    /// Every line read so far, in order.
    pub lines: Vec<String>,
    /// Lines before this index were already matched by [`EventStream::wait_for`].
    cursor: usize,
}

impl EventStream {
    fn spawn(mut cmd: Command, stderr: PathBuf) -> EventStream {
        let err = std::fs::File::create(&stderr).expect("events stderr file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Ends at EOF (the child exited or was killed).
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        EventStream { child, rx, stderr, lines: Vec::new(), cursor: 0 }
    }

    /// Takes the next line if one arrives before `deadline`; false when the deadline
    /// passed or the stream ended.
    fn pull(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(line) => {
                self.lines.push(line);
                true
            }
            Err(_) => false,
        }
    }

    /// Reads lines until one after the last match (parsed as JSON) satisfies `pred`;
    /// returns its index in [`EventStream::lines`]. Panics, showing every line,
    /// when none does within `timeout`.
    pub fn wait_for(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            while self.cursor < self.lines.len() {
                let i = self.cursor;
                self.cursor += 1;
                if serde_json::from_str::<Value>(&self.lines[i]).is_ok_and(|v| pred(&v)) {
                    return i;
                }
            }
            if !self.pull(deadline) {
                panic!("events: no line within {timeout:?} for: {what}\n{}", self.describe());
            }
        }
    }

    /// Every line so far, numbered, and the child's stderr.
    pub fn describe(&self) -> String {
        let mut out = String::from("--- events seen:\n");
        for (i, l) in self.lines.iter().enumerate() {
            out.push_str(&format!("{i:4} {l}\n"));
        }
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        out.push_str(&format!("--- events stderr:\n{err}"));
        out
    }

    /// Kills the child and collects what it printed before (bounded).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = crate::tools::wait_deadline(&mut self.child, Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pull(deadline) {}
    }

    /// The lines parsed as JSON (panics on a line that is not).
    pub fn json(&self) -> Vec<Value> {
        self.lines
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("event line {l:?}: {e}\n{}", self.describe()))
            })
            .collect()
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = crate::tools::wait_deadline(&mut self.child, Duration::from_secs(10));
    }
}
