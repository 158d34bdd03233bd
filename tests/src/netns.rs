//! Two network namespaces joined by a veth pair: two "hosts" on one machine,
//! with a link a test can cut (`ip link set … down`) and restore, or whose TCP
//! connections one side can abort (`ss -K`).
//!
//! Names are `blkd-<tag>-<pid>-a` / `-b` (the tag names the test, the pid the
//! test process), so concurrent tests and concurrent runs never share one.
//! [`NetnsPair::create`] first removes namespaces of the same tag left by a
//! crashed run (their pid is no longer alive), killing by PID only the blockd
//! processes still inside them. Drop deletes the namespaces (which deletes the
//! veth pair with them).
//!
//! Test code can run inside a namespace too: [`NetnsPair::spawn_in`] /
//! [`NetnsPair::run_in`] run a closure on a thread that joined namespace `i`
//! (`setns`, which moves only the calling thread), so its sockets live there.
//! [`NetnsPair::limit_rate`] shapes one direction of the link with `tc tbf`.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::tools::{Output, run_capture};

/// Every `ip` command is bounded by this.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// The veth pair's addresses: a /30 of a private range (the namespaces are
/// private, so every pair can use the same one).
pub const ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 251, 0, 1), Ipv4Addr::new(10, 251, 0, 2)];
const PREFIX_LEN: u8 = 30;
/// The veth end inside namespace 0 and 1.
pub const VETH: [&str; 2] = ["blkd-veth-a", "blkd-veth-b"];

/// Two namespaces and the veth pair between them. Drop removes them.
#[derive(Debug)]
pub struct NetnsPair {
    pub ns: [String; 2],
}

/// The `ip` program (iproute2).
fn ip_program() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("ip not found: install with apt-get install -y iproute2"))
}

fn ip(args: &[&str]) -> Output {
    let mut cmd = Command::new(ip_program());
    cmd.args(args);
    run_capture(&mut cmd, IP_TIMEOUT)
}

fn ip_ok(args: &[&str]) -> Output {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?} failed\n{}", out.describe());
    out
}

fn name_prefix(tag: &str) -> String {
    format!("blkd-{tag}-")
}

impl NetnsPair {
    /// Creates `blkd-<tag>-<pid>-a` and `-b`, the veth pair (`VETH[i]` in
    /// namespace `i`, address `ADDRS[i]/30`), and brings it and `lo` up in both.
    pub fn create(tag: &str) -> NetnsPair {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test needs root (network namespaces, veth)");
        assert!(
            tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "tag {tag:?}: letters and digits only (it is parsed back by the stale cleanup)"
        );
        remove_stale(tag);
        let base = format!("{}{}", name_prefix(tag), std::process::id());
        let pair = NetnsPair { ns: [format!("{base}-a"), format!("{base}-b")] };
        // From here on, Drop cleans up whatever was created.
        for ns in &pair.ns {
            ip_ok(&["netns", "add", ns]);
        }
        ip_ok(&[
            "link",
            "add",
            VETH[0],
            "netns",
            &pair.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            VETH[1],
            "netns",
            &pair.ns[1],
        ]);
        for i in 0..2 {
            let addr = format!("{}/{PREFIX_LEN}", ADDRS[i]);
            ip_ok(&["-n", &pair.ns[i], "addr", "add", &addr, "dev", VETH[i]]);
            ip_ok(&["-n", &pair.ns[i], "link", "set", "lo", "up"]);
            ip_ok(&["-n", &pair.ns[i], "link", "set", VETH[i], "up"]);
        }
        pair
    }

    /// The command prefix that runs a program inside namespace `i`
    /// (`ip netns exec` execs the program: its PID is the program's).
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        vec![ip_program().display().to_string(), "netns".into(), "exec".into(), self.ns[i].clone()]
    }

    /// Sets namespace `i`'s veth end down (`up = false`: the link is cut) or up.
    pub fn set_link(&self, i: usize, up: bool) {
        ip_ok(&["-n", &self.ns[i], "link", "set", VETH[i], if up { "up" } else { "down" }]);
    }

    /// Aborts every established TCP connection to or from `port` in namespace `i`
    /// (`ss -K`; the kernel needs `CONFIG_INET_DIAG_DESTROY`): that side's sockets
    /// fail at once (ECONNABORTED) and the other side gets a RST (ECONNRESET). A
    /// link cut from side `i` that both ends notice without waiting for a keepalive
    /// to expire. Returns how many connections were aborted.
    pub fn abort_tcp(&self, i: usize, port: u16) -> usize {
        let port = format!(":{port}");
        let out = ip_ok(&[
            "netns",
            "exec",
            &self.ns[i],
            "ss",
            "-K",
            "-H",
            "-t",
            "-n",
            "state",
            "established",
            "(",
            "sport",
            "=",
            &port,
            "or",
            "dport",
            "=",
            &port,
            ")",
        ]);
        out.stdout.lines().filter(|l| !l.trim().is_empty()).count()
    }

    /// Limits what namespace `i` sends over its veth end to `rate_mbit` Mbit/s
    /// (`tc qdisc … root tbf`: a token bucket; netem is not built into this
    /// kernel). The bucket holds 10 ms of the rate (at least 64 KiB, so a GSO
    /// packet fits); packets wait up to 400 ms in the queue before tbf drops.
    pub fn limit_rate(&self, i: usize, rate_mbit: u64) {
        assert!(rate_mbit > 0, "rate 0: set the link down instead");
        let burst_bytes = (rate_mbit * 1_000_000 / 8 / 100).max(64 << 10);
        ip_ok(&[
            "netns",
            "exec",
            &self.ns[i],
            "tc",
            "qdisc",
            "replace",
            "dev",
            VETH[i],
            "root",
            "tbf",
            "rate",
            &format!("{rate_mbit}mbit"),
            "burst",
            &burst_bytes.to_string(),
            "latency",
            "400ms",
        ]);
    }

    /// Runs `f` on a new thread inside namespace `i` (see the module docs).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let ns = self.ns[i].clone();
        std::thread::Builder::new()
            .name(format!("netns-{i}"))
            .spawn(move || {
                enter(&ns);
                f()
            })
            .expect("spawn a thread for a namespace")
    }

    /// [`NetnsPair::spawn_in`] and wait for the result (a panic in `f` is
    /// re-raised here).
    pub fn run_in<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(i, f).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// Moves the calling thread into namespace `ns` (one of ours).
fn enter(ns: &str) {
    let path = Path::new("/run/netns").join(ns);
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns(2) on a valid namespace fd; for CLONE_NEWNET it changes only
    // the calling thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns into {ns}: {}", std::io::Error::last_os_error());
}

/// Is the calling thread in a namespace like ours: one whose only interfaces
/// are `lo` and a veth end named [`VETH`] (read from
/// `/proc/thread-self/net/dev`)? Then a veth address cannot lead anywhere else.
pub fn in_test_netns() -> bool {
    let Ok(dev) = std::fs::read_to_string("/proc/thread-self/net/dev") else { return false };
    let names: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    names.iter().any(|n| VETH.contains(n)) && names.iter().all(|n| *n == "lo" || VETH.contains(n))
}

/// May a test connect to `ip` from the calling thread: loopback, or a veth
/// address of [`ADDRS`] from inside a namespace (outside one, such an address
/// would be routed to the real network).
pub fn test_address(ip: IpAddr) -> bool {
    ip.is_loopback() || matches!(ip, IpAddr::V4(a) if ADDRS.contains(&a)) && in_test_netns()
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in &self.ns {
            delete(ns);
        }
    }
}

/// Kills (by PID) the blockd processes still inside `ns`, then deletes it.
/// Best effort: problems are printed, never panics (it runs in Drop).
fn delete(ns: &str) {
    if !Path::new("/run/netns").join(ns).exists() {
        return;
    }
    let pids = ip(&["netns", "pids", ns]);
    for pid in pids.stdout.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "blockd" {
            eprintln!("netns {ns}: killing leftover blockd (pid {pid})");
            // SAFETY: kill(2) on a PID just listed inside our own namespace,
            // checked to be a blockd process.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        } else {
            eprintln!("netns {ns}: process {pid} ({}) left alone", comm.trim());
        }
    }
    let out = ip(&["netns", "del", ns]);
    if !out.status.success() {
        eprintln!("warning: deleting netns {ns} failed\n{}", out.describe());
    }
}

/// Deletes namespaces of this tag whose creating process is gone (a run that
/// crashed or was killed before its Drop ran). Live runs are never touched.
fn remove_stale(tag: &str) {
    let prefix = name_prefix(tag);
    let list = ip_ok(&["netns", "list"]);
    for name in list.stdout.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let Some((pid, side)) = rest.split_once('-') else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !matches!(side, "a" | "b") || pid == std::process::id() {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing netns {name} left by a crashed run (pid {pid} is gone)");
            delete(name);
        }
    }
}
