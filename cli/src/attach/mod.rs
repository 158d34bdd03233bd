//! `blockctl attach RESOURCE /dev/nbdN` and `blockctl detach /dev/nbdN`: the kernel
//! NBD client on top of a blockd resource.
//!
//! - [`dial`] finds the Primary among the config's nodes and negotiates the export
//!   in userspace (`nbd-server`'s client handshake).
//! - [`genl`] hands the sockets to the kernel through the `nbd` generic-netlink
//!   family (CONNECT with size, 4 KiB blocks, server flags, I/O and dead-connection
//!   timeouts, a backend identifier `blockd:RESOURCE`); [`ioctl`] is the fallback
//!   when the family is missing (no reconnect there).
//! - The **resident**: `attach` forks a small process that does the CONNECT (so
//!   `/sys/block/nbdN/pid` names it), then waits on the family's multicast group for
//!   `LINK_DEAD`. On a dead link it dials every node again until the new Primary
//!   answers with the same size and flags, and swaps the new sockets in with
//!   RECONFIGURE, while the kernel holds I/O for up to the dead-connection timeout:
//!   a mounted filesystem survives a failover without a remount. It exits when the
//!   device is disconnected, or on SIGTERM (leaving the device as it is).
//! - [`busy`]: `detach` refuses while the device is mounted, held or open, unless
//!   `--force`.

mod busy;
mod dial;
mod genl;
mod ioctl;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blockd::config::Config;
use blockd::safety::{IoPathSafety, protect_io_path};

use crate::{Fail, refused, usage};
use genl::{ConnectParams, Event, Nbd};

/// What `attach` was asked for.
#[derive(Debug)]
pub struct AttachOptions {
    pub device: PathBuf,
    pub connections: usize,
    pub timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub force_ioctl: bool,
    pub foreground: bool,
    pub log: Option<PathBuf>,
}

/// Most connections per device (the kernel's limit is higher; more buys nothing
/// against one server).
const MAX_CONNECTIONS: usize = 16;
/// How often the resident checks that the device is still configured.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Between reconnect rounds (every node tried once per round).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// `detach` waits this long for the resident to exit and the device to go.
const DETACH_DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

/// The index N of `/dev/nbdN` (or `nbdN`).
fn device_index(device: &Path) -> Result<u32, Fail> {
    let name = device.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.strip_prefix("nbd")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| usage(format!("{}: not an NBD device (expected /dev/nbdN)", device.display())))
}

fn backend_of(config: &Config) -> String {
    format!("blockd:{}", config.resource.name)
}

fn sys(index: u32, attr: &str) -> Option<String> {
    fs::read_to_string(format!("/sys/block/nbd{index}/{attr}")).ok().map(|s| s.trim().to_string())
}

/// Where a resident records its pid: `/sys/block/nbdN/pid` names the process that
/// sent CONNECT, which is not the resident after an adoption.
fn pidfile(index: u32) -> PathBuf {
    PathBuf::from(format!("/run/blockd/attach-nbd{index}.pid"))
}

/// Whether `pid` (a thread or process id) is a live `blockctl attach` of
/// `/dev/nbdN`; its process id if so (the kernel records the configuring thread; in
/// ioctl mode that is not the main thread, hence the thread group id).
fn attach_process(pid: u32, index: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
    (field("Name:")? == "blockctl").then_some(())?;
    let tgid: u32 = field("Tgid:")?.parse().ok()?;
    let cmdline = fs::read(format!("/proc/{tgid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
    let device = format!("nbd{index}");
    let ours = args.any(|a| a == "attach") && args.any(|a| a.rsplit('/').next() == Some(device.as_str()));
    ours.then_some(tgid)
}

/// The live resident of `/dev/nbdN`, if any.
fn resident_pid(index: u32) -> Option<u32> {
    let from_sys = sys(index, "pid").and_then(|p| p.parse().ok());
    let from_file = fs::read_to_string(pidfile(index)).ok().and_then(|p| p.trim().parse().ok());
    [from_sys, from_file].into_iter().flatten().find_map(|pid| attach_process(pid, index))
}

/// How the device is driven.
enum Driver {
    Netlink(Nbd),
    Ioctl,
}

fn driver(index: u32, force_ioctl: bool) -> Result<Driver, Fail> {
    let dev_exists = Path::new(&format!("/dev/nbd{index}")).exists();
    if !force_ioctl {
        match Nbd::open() {
            Ok(Some(nbd)) => return Ok(Driver::Netlink(nbd)),
            Ok(None) => {}
            Err(e) => return Err(refused(format!("cannot talk to the kernel over netlink: {e}"))),
        }
    }
    if dev_exists {
        Ok(Driver::Ioctl)
    } else {
        Err(refused(format!(
            "/dev/nbd{index} does not exist and the kernel has no nbd netlink family: \
             the nbd module is not loaded (`modprobe nbd`)"
        )))
    }
}

fn is_attached(driver: &mut Driver, index: u32) -> Result<bool, Fail> {
    match driver {
        Driver::Netlink(nbd) => {
            nbd.is_connected(index).map_err(|e| refused(format!("nbd status of /dev/nbd{index}: {e}")))
        }
        // The kernel creates the attribute while the device runs.
        Driver::Ioctl => Ok(sys(index, "pid").is_some()),
    }
}

fn explain_errno(e: &std::io::Error, index: u32) -> String {
    match e.raw_os_error() {
        Some(libc::EBUSY) => format!("/dev/nbd{index} is busy (attached or being set up by someone else)"),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "permission denied: attaching needs root (CAP_SYS_ADMIN)".into()
        }
        Some(libc::EINVAL) => format!("the kernel rejected the configuration of /dev/nbd{index}: {e}"),
        _ => e.to_string(),
    }
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// SIGTERM/SIGINT set a flag and interrupt blocking calls (no `SA_RESTART`).
fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a plain handler that only stores an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_terminate as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn log(index: u32, msg: impl std::fmt::Display) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    eprintln!("{}.{:03} blockctl attach nbd{index}: {msg}", now.as_secs(), now.subsec_millis());
}

pub fn attach(config: &Config, opts: AttachOptions) -> Result<(), Fail> {
    let index = device_index(&opts.device)?;
    if !(1..=MAX_CONNECTIONS).contains(&opts.connections) {
        return Err(usage(format!("--connections must be 1..={MAX_CONNECTIONS}")));
    }
    if opts.timeout_secs == 0 {
        // 0 would make the kernel retry a stuck request forever, silently.
        return Err(usage("--timeout-secs must be at least 1"));
    }
    if let Some(why) = dial::tls_only(config) {
        return Err(refused(why));
    }
    let mut driver = driver(index, opts.force_ioctl)?;
    // A device attached to this resource whose resident is gone (killed, crashed) is
    // adopted: a new resident reconnects and watches it.
    let mut adopt = false;
    if is_attached(&mut driver, index)? {
        let backend = sys(index, "backend").filter(|b| !b.is_empty()).unwrap_or_else(|| "unknown".into());
        let resident = resident_pid(index);
        adopt = matches!(driver, Driver::Netlink(_)) && backend == backend_of(config) && resident.is_none();
        if !adopt {
            let pid =
                resident.map_or_else(|| sys(index, "pid").unwrap_or_else(|| "?".into()), |p| p.to_string());
            return Err(refused(format!(
                "/dev/nbd{index} is already attached (backend {backend}, pid {pid}); `blockctl detach /dev/nbd{index}` first"
            )));
        }
    }
    let rt = dial::runtime().map_err(|e| refused(format!("cannot start the async runtime: {e}")))?;
    let session = dial::primary(&rt, config, opts.connections, None).map_err(refused)?;
    drop(rt);
    if adopt {
        let device_bytes = sys(index, "size").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * 512;
        if device_bytes != session.details.size_bytes {
            return Err(refused(format!(
                "/dev/nbd{index} has {device_bytes} bytes but {} exports {}; detach it and attach again",
                session.node, session.details.size_bytes
            )));
        }
    }
    let summary = format!(
        "{} /dev/nbd{index} to {} on {} ({}), {} bytes, {} connection(s), {}",
        if adopt { "adopted (its resident was gone)" } else { "attached" },
        config.resource.name,
        session.node,
        session.addr,
        session.details.size_bytes,
        session.sockets.len(),
        match driver {
            Driver::Netlink(_) => "netlink; reconnects after a failover",
            Driver::Ioctl => "ioctl interface: no reconnect after a failover",
        }
    );
    if opts.foreground {
        return resident(config, &opts, index, driver, session, adopt, &mut Reporter::stdout(summary))
            .map_err(refused);
    }
    let log_path =
        opts.log.clone().unwrap_or_else(|| PathBuf::from(format!("/var/log/blockd/attach-nbd{index}.log")));
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir).map_err(|e| refused(format!("cannot create {}: {e}", dir.display())))?;
    }
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| refused(format!("cannot open log {}: {e}", log_path.display())))?;
    let (read_end, write_end) = pipe().map_err(|e| refused(format!("pipe: {e}")))?;
    // SAFETY: blockctl is single-threaded here (the runtime above was a
    // current-thread one and is dropped), so the child may run arbitrary code.
    match unsafe { libc::fork() } {
        -1 => Err(refused(format!("fork: {}", std::io::Error::last_os_error()))),
        0 => {
            drop(read_end);
            detach_from_terminal(&log_file);
            let mut reporter = Reporter::pipe(write_end, summary.clone());
            let code = match resident(config, &opts, index, driver, session, adopt, &mut reporter) {
                Ok(()) => 0,
                Err(e) => {
                    log(index, &e);
                    reporter.fail(&e);
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(write_end);
            drop(session);
            let mut answer = String::new();
            let _ = fs::File::from(read_end).read_to_string(&mut answer);
            match answer.split_once('\n') {
                Some(("ok", _)) => {
                    println!("{summary}");
                    Ok(())
                }
                Some(("err", msg)) => Err(refused(msg.trim_end())),
                _ => Err(refused(format!(
                    "the attach process exited before the device was ready; see {}",
                    log_path.display()
                ))),
            }
        }
    }
}

/// Records this resident's pid for `detach` and a later `attach` (best effort: the
/// sysfs pid still names it unless this is an adoption).
fn write_pidfile(index: u32) -> bool {
    let path = pidfile(index);
    let written = path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&path, format!("{}\n", std::process::id())));
    if let Err(e) = &written {
        log(index, format_args!("warning: cannot write {}: {e}", path.display()));
    }
    written.is_ok()
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The resident's own session; stdin from /dev/null, stdout and stderr to the log.
fn detach_from_terminal(log_file: &fs::File) {
    // SAFETY: setsid/dup2 on descriptors this process owns.
    unsafe {
        libc::setsid();
        if let Ok(null) = fs::File::open("/dev/null") {
            libc::dup2(null.as_raw_fd(), 0);
        }
        libc::dup2(log_file.as_raw_fd(), 1);
        libc::dup2(log_file.as_raw_fd(), 2);
    }
}

/// Tells whoever waits for `attach` that the device is ready (or why not): the
/// parent through a pipe (it prints `summary`), or stdout in the foreground.
struct Reporter {
    pipe: Option<fs::File>,
    summary: String,
}

impl Reporter {
    fn pipe(fd: OwnedFd, summary: String) -> Reporter {
        Reporter { pipe: Some(fs::File::from(fd)), summary }
    }

    fn stdout(summary: String) -> Reporter {
        Reporter { pipe: None, summary }
    }

    /// Logs the summary and reports readiness.
    fn ready(&mut self, index: u32) {
        log(index, &self.summary);
        match self.pipe.take() {
            Some(mut p) => {
                let _ = p.write_all(b"ok\n");
            }
            None => println!("{}", self.summary),
        }
    }

    fn fail(&mut self, msg: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(format!("err\n{msg}\n").as_bytes());
        }
    }
}

/// Configures the device, reports readiness, then keeps it connected until it is
/// detached. Runs in the forked resident (or in the foreground).
fn resident(
    config: &Config,
    opts: &AttachOptions,
    index: u32,
    driver: Driver,
    session: dial::Session,
    adopt: bool,
    reporter: &mut Reporter,
) -> Result<(), String> {
    install_signal_handlers();
    for w in protect_io_path(IoPathSafety { mlock: true, oom_score_adj: Some(-1000) }) {
        log(index, format_args!("warning: {w}"));
    }
    let size = session.details.size_bytes;
    // 4 KiB blocks (no read-modify-write for 4Kn backing stores) unless the export is
    // not a multiple of that.
    let block_size: u64 = if size.is_multiple_of(4096) { 4096 } else { 512 };
    let fds: Vec<RawFd> = session.sockets.iter().map(AsRawFd::as_raw_fd).collect();
    let flags = u64::from(session.details.transmission_flags);
    let backend = backend_of(config);
    match driver {
        Driver::Ioctl => {
            let dev = ioctl::configure(&opts.device, size, block_size, opts.timeout_secs, flags, &fds)
                .map_err(|e| explain_errno(&e, index))?;
            // The kernel holds the sockets now.
            drop(session);
            // NBD_DO_IT blocks while the device runs; report readiness once the
            // kernel shows the device running.
            let ready = std::thread::spawn(move || dev.run());
            let deadline = Instant::now() + Duration::from_secs(10);
            while sys(index, "pid").is_none() && !ready.is_finished() && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            if sys(index, "pid").is_none() {
                let why = match ready.join() {
                    Ok(Err(e)) => explain_errno(&e, index),
                    _ => "the device did not start".to_string(),
                };
                return Err(why);
            }
            reporter.ready(index);
            let result = ready.join().map_err(|_| "the device thread panicked".to_string())?;
            log(index, format_args!("device stopped: {result:?}"));
            Ok(())
        }
        Driver::Netlink(mut nbd) => {
            // Subscribe before CONNECT, so no LINK_DEAD can be missed.
            let mut events =
                nbd.subscribe(Duration::from_millis(500)).map_err(|e| format!("nbd events: {e}"))?;
            if adopt {
                // Its connections may have died while nobody watched: the fresh
                // sockets fill dead slots (the kernel ignores them if none is dead).
                nbd.reconfigure(index, &backend, &fds).map_err(|e| explain_errno(&e, index))?;
            } else {
                nbd.connect(&ConnectParams {
                    index,
                    size_bytes: size,
                    block_size_bytes: block_size,
                    timeout_secs: opts.timeout_secs,
                    dead_conn_timeout_secs: opts.dead_conn_timeout_secs,
                    server_flags: flags,
                    backend: &backend,
                    fds: &fds,
                })
                .map_err(|e| explain_errno(&e, index))?;
            }
            let expect = session.details.clone();
            drop(session);
            let recorded = write_pidfile(index);
            reporter.ready(index);
            let result = watch(config, opts, index, &mut nbd, &mut events, &expect, &backend);
            if recorded {
                let _ = fs::remove_file(pidfile(index));
            }
            result
        }
    }
}

/// The resident's loop: wait for dead links and reconnect; leave when the device is
/// disconnected or on a signal.
fn watch(
    config: &Config,
    opts: &AttachOptions,
    index: u32,
    nbd: &mut Nbd,
    events: &mut genl::Events,
    expect: &nbd_server::client::ExportDetails,
    backend: &str,
) -> Result<(), String> {
    let rt = dial::runtime().map_err(|e| format!("async runtime: {e}"))?;
    let mut last_status = Instant::now();
    loop {
        if TERMINATE.load(Ordering::SeqCst) {
            log(index, "stopping on a signal; the device stays as it is");
            return Ok(());
        }
        let got = events.next().map_err(|e| format!("nbd events: {e}"))?;
        let dead = got.iter().any(|e| match e {
            Event::LinkDead(i) => *i == index,
            // Lost notifications: reconnecting is harmless when nothing died (the
            // kernel ignores sockets it has no dead slot for).
            Event::Overrun => true,
            Event::Idle | Event::Interrupted => false,
        });
        if dead {
            reconnect(config, opts, index, nbd, &rt, expect, backend)?;
            last_status = Instant::now();
        }
        if last_status.elapsed() >= STATUS_INTERVAL {
            last_status = Instant::now();
            match nbd.is_connected(index) {
                Ok(true) => {}
                Ok(false) => {
                    log(index, "the device was disconnected; exiting");
                    return Ok(());
                }
                Err(e) => log(index, format_args!("status: {e}")),
            }
        }
    }
}

fn reconnect(
    config: &Config,
    opts: &AttachOptions,
    index: u32,
    nbd: &mut Nbd,
    rt: &tokio::runtime::Runtime,
    expect: &nbd_server::client::ExportDetails,
    backend: &str,
) -> Result<(), String> {
    let started = Instant::now();
    log(index, "a connection died; looking for the Primary");
    let mut last_report = Instant::now();
    loop {
        if TERMINATE.load(Ordering::SeqCst) {
            return Ok(());
        }
        if !nbd.is_connected(index).unwrap_or(true) {
            // Detached meanwhile; the caller's status check ends the loop.
            return Ok(());
        }
        match dial::primary(rt, config, opts.connections, Some(expect)) {
            Ok(session) => {
                let fds: Vec<RawFd> = session.sockets.iter().map(AsRawFd::as_raw_fd).collect();
                match nbd.reconfigure(index, backend, &fds) {
                    Ok(()) => {
                        log(
                            index,
                            format_args!(
                                "reconnected to {} ({}) after {:.1} s",
                                session.node,
                                session.addr,
                                started.elapsed().as_secs_f64()
                            ),
                        );
                        return Ok(());
                    }
                    Err(e) => log(index, format_args!("reconfigure: {}", explain_errno(&e, index))),
                }
            }
            Err(e) => {
                if last_report.elapsed() >= Duration::from_secs(10)
                    || started.elapsed() < RECONNECT_BACKOFF * 2
                {
                    log(index, &e);
                    last_report = Instant::now();
                }
            }
        }
        // A retry interval between rounds of dialing, not a synchronization sleep.
        std::thread::sleep(RECONNECT_BACKOFF);
    }
}

/// `blockctl detach [RESOURCE] /dev/nbdN [--force]`.
pub fn detach(resource: Option<&str>, device: &Path, force: bool) -> Result<(), Fail> {
    let index = device_index(device)?;
    let mut driver = driver(index, false)?;
    if !is_attached(&mut driver, index)? {
        return Err(refused(format!("/dev/nbd{index} is not attached")));
    }
    let backend = sys(index, "backend").unwrap_or_default();
    if let Some(res) = resource
        && !backend.is_empty()
        && backend != format!("blockd:{res}")
    {
        return Err(refused(format!("/dev/nbd{index} is attached to {backend}, not to blockd:{res}")));
    }
    let resident = resident_pid(index);
    if !force && let Some(why) = busy::in_use(index, resident) {
        return Err(refused(format!(
            "/dev/nbd{index} is in use ({why}): unmount it or stop its users first, or use \
             `blockctl detach --force` (its outstanding and later I/O fails)"
        )));
    }
    let in_use = busy::in_use(index, resident);
    // DISCONNECT first: the kernel sends NBD_CMD_DISC to the server and does not
    // report the closed sockets as dead links, so the resident does not reconnect.
    let sent = match &mut driver {
        Driver::Netlink(nbd) => nbd.disconnect(index),
        Driver::Ioctl => ioctl::disconnect(device),
    };
    if let Err(e) = sent {
        return Err(refused(format!("disconnect /dev/nbd{index}: {}", explain_errno(&e, index))));
    }
    let deadline = Instant::now() + DETACH_DEADLINE;
    if let Some(pid) = resident {
        // The resident leaves by itself once it sees the device disconnected; a
        // device still held open (--force) stays "connected", so tell it.
        let alive = || Path::new(&format!("/proc/{pid}")).exists() && resident_pid(index) == Some(pid);
        let soft = Instant::now() + Duration::from_secs(3);
        while alive() && Instant::now() < soft {
            std::thread::sleep(POLL);
        }
        if alive() {
            // SAFETY: kill(2) on the pid the kernel names for this device, checked
            // to be a blockctl resident just above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        while alive() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }
    while in_use.is_none() && is_attached(&mut driver, index)? && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
    match in_use {
        Some(why) => {
            println!("detached /dev/nbd{index} although it was in use ({why}): its I/O fails from now on")
        }
        None => println!("detached /dev/nbd{index}"),
    }
    Ok(())
}
