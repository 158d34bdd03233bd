//! Running external programs: captured output, a deadline, and a panic that
//! shows the command line, exit status, stdout and stderr on failure.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Default upper bound on any one external command.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Debian's interpreter: the `python3` on PATH may lack the `nbd` module.
pub const PYTHON: &str = "/usr/bin/python3";

/// The (program, Debian package) of every external tool the suite uses.
const PACKAGES: &[(&str, &str)] = &[
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbdfuse", "libnbd-bin"),
    ("nbdsh", "python3-libnbd"),
    ("nbdkit", "nbdkit"),
    ("qemu-io", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("fio", "fio"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("fusermount3", "fuse3"),
    ("ocf-tester", "resource-agents"),
    ("xmllint", "libxml2-utils"),
    ("cibadmin", "pacemaker-cli-utils"),
    ("crm_attribute", "pacemaker-cli-utils"),
    ("crm_simulate", "pacemaker-cli-utils"),
    ("promtool", "prometheus"),
    ("systemd-analyze", "systemd"),
    ("man", "man-db"),
    ("dpkg-deb", "dpkg"),
    ("zsh", "zsh"),
    ("fish", "fish"),
];

/// Finds `program` on PATH (plus the sbin directories); panics with the
/// install command when it is missing. Tests never skip for a missing tool.
pub fn require(program: &str) -> PathBuf {
    let pkg = PACKAGES.iter().find(|(p, _)| *p == program).map(|(_, pkg)| *pkg).unwrap_or(program);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    for dir in std::env::split_paths(&path).chain(extra) {
        let cand = dir.join(program);
        if is_executable(&cand) {
            return cand;
        }
    }
    panic!("{program} not found: install with apt-get install -y {pkg}");
}

/// Panics unless Debian's python3 with the libnbd bindings is present.
pub fn require_python_nbd() -> PathBuf {
    let py = PathBuf::from(PYTHON);
    if !is_executable(&py) {
        panic!("{PYTHON} not found: install with apt-get install -y python3-libnbd");
    }
    let ok = Command::new(&py)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "python module nbd not importable by {PYTHON}: install with apt-get install -y python3-libnbd"
        );
    }
    py
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Captured result of a finished command.
#[derive(Debug)]
pub struct Output {
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.status,
            tail(&self.stdout, 200),
            tail(&self.stderr, 200)
        )
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines]\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}

/// Shell-like rendering of a command for messages.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"', '*', '?', '&', ';']) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` up to `timeout`; on expiry kills it (that PID only) and
/// returns None.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("wait: {e}"),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Runs `cmd` to completion (bounded by `timeout`), capturing its output.
/// Does not judge the exit status.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> Output {
    let line = cmdline(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {line}: {e}"));
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_deadline(&mut child, timeout);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Output { cmdline: line, status, stdout, stderr },
        None => panic!(
            "command timed out after {timeout:?} and was killed: {line}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            tail(&stdout, 100),
            tail(&stderr, 100)
        ),
    }
}

/// Runs `cmd`; panics with the command line, stdout and stderr unless it
/// exits 0 within `timeout`.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run_capture(cmd, timeout);
    if !out.status.success() {
        panic!("command failed\n{}", out.describe());
    }
    out
}

/// `run_ok` for a named tool (resolved with [`require`]) and arguments.
pub fn tool<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let path = require(program);
    run_ok(Command::new(path).args(args), TOOL_TIMEOUT)
}

/// Path of a helper script under `tests/py/`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Runs `tests/py/nbdcheck.py CASE ARGS...` with Debian's python3; panics on
/// failure and unless the script reports `PASS CASE`. Returns stdout.
pub fn nbdcheck<S: AsRef<OsStr>>(case: &str, args: &[S]) -> String {
    let py = require_python_nbd();
    let out =
        run_ok(Command::new(py).arg("-u").arg(py_script("nbdcheck.py")).arg(case).args(args), TOOL_TIMEOUT);
    let want = format!("PASS {case}");
    assert!(
        out.stdout.lines().any(|l| l.trim() == want),
        "script did not report {want:?}\n{}",
        out.describe()
    );
    out.stdout
}

/// A background process with stdout+stderr in a log file; killed (its PID
/// only) on drop, with its log tail printed when the test is failing.
#[derive(Debug)]
pub struct Background {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Background {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Background {
        let line = cmdline(cmd);
        let f = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().expect("dup")))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {line}: {e}"));
        Background { name: name.to_string(), child: Some(child), log: log.to_path_buf() }
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        self.child.as_mut().map(|c| matches!(c.try_wait(), Ok(None))).unwrap_or(false)
    }

    /// Sends `signal` (by PID) and waits up to `timeout` for the exit, e.g. SIGINT so
    /// that a capture writes out what it has.
    pub fn signal_and_wait(&mut self, signal: libc::c_int, timeout: Duration) -> ExitStatus {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's PID, which is not yet reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, signal) };
        }
        self.wait(timeout)
    }

    /// Waits up to `timeout`; panics (after killing it) if it is still
    /// running then. Returns the exit status.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("already waited");
        match wait_deadline(&mut child, timeout) {
            Some(st) => st,
            None => {
                panic!("{} still running after {timeout:?}; killed\n{}", self.name, tail(&self.log(), 60))
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!("--- {} log ({}) ---\n{}", self.name, self.log.display(), tail(&self.log(), 40));
        }
    }
}
