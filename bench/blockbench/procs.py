"""Process supervision and files: every child is started here, in its own
process group, with PR_SET_PDEATHSIG so it dies even if bench/run is
SIGKILLed, and is stopped by PID (TERM, then KILL after a bounded wait) on
exit.  Also the run's temp dir (with an owner file, so a later run removes it
if this one was killed), page-cache eviction of one file, CPU time of
processes, and byte comparison of two files."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .common import GiB, MiB, BenchError, fmt_size, log, shlex_join

_PROCS: list["Child"] = []
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    name: str
    cmd: list[str]
    popen: subprocess.Popen
    log_path: Path
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + l for l in lines[-n:]) or "    (empty log)"

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM the child (by PID), wait, SIGKILL its process group if needed."""
        if self.stopped:
            return self.popen.returncode
        self.stopped = True
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout:.0f}s; SIGKILL")
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        else:
            self.popen.wait()
        # Reap anything left in the child's own process group (e.g. fio workers).
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.popen.returncode


def spawn(name: str, cmd: list[str], log_path: Path, cwd: Optional[Path] = None) -> Child:
    log_f = open(log_path, "ab")
    try:
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_f, stderr=subprocess.STDOUT,
            cwd=cwd, start_new_session=True, preexec_fn=_child_setup,
        )
    finally:
        log_f.close()
    c = Child(name, cmd, p, log_path)
    _PROCS.append(c)
    return c


def stop_all() -> None:
    for c in reversed(_PROCS):
        c.stop()


def run_bounded(name: str, cmd: list[str], log_path: Path, timeout: float,
                cwd: Optional[Path] = None) -> None:
    """Run a helper command to completion (tracked, killable, bounded)."""
    c = spawn(name, cmd, log_path, cwd)
    try:
        rc = c.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        c.stop(timeout=2)
        raise BenchError(f"{name} did not finish within {timeout:.0f}s: {shlex_join(cmd)}\n{c.log_tail()}")
    c.stopped = True
    if rc != 0:
        raise BenchError(f"{name} failed (exit {rc}): {shlex_join(cmd)}\n{c.log_tail()}")


def capture(cmd: list[str], timeout: float = 30) -> str:
    """Short command whose output we want (versions, sizes)."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
    if r.returncode != 0:
        raise BenchError(f"{shlex_join(cmd)} failed (exit {r.returncode}): {r.stderr.strip()}")
    return r.stdout


def stop_running() -> None:
    """After a failed part of a scenario: stop whatever it left running (by PID)."""
    for c in reversed(_PROCS):
        if not c.stopped:
            c.stop(timeout=10)


TMP_PREFIX = "blockd-bench."
OWNER_FILE = "owner.pid"


def remove_stale_tmpdirs(workdir: Path) -> None:
    """Delete temp dirs of earlier runs that were SIGKILLed (their owner pid is
    gone).  Only dirs carrying our owner file are touched."""
    for d in workdir.glob(TMP_PREFIX + "*"):
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            alive = "run" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            alive = False
        if not alive:
            log(f"removing stale temp dir {d} (owner pid {pid} is gone)")
            shutil.rmtree(d, ignore_errors=True)


def fs_of(path: Path) -> str:
    best, fstype = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, fstype = mnt, typ
    except OSError:
        pass
    return f"{fstype} on {best or '?'}"


def check_workdir(workdir_arg: str, need: int) -> Path:
    """--workdir resolved, after checking it exists and has `need` bytes free
    (and warning if it is in RAM)."""
    workdir = Path(workdir_arg).resolve()
    if not workdir.is_dir():
        raise BenchError(f"--workdir {workdir} does not exist")
    fsdesc = fs_of(workdir)
    if fsdesc.split()[0] in ("tmpfs", "ramfs"):
        log(f"warning: {workdir} is {fsdesc}: backing files will live in RAM, not on disk")
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise BenchError(f"{workdir} has {fmt_size(free)} free; need about {need / GiB:.1f} GiB")
    return workdir


def make_tmpdir(workdir: Path) -> Path:
    """This run's temp dir under workdir, with the owner file; temp dirs of dead
    runs are removed first."""
    remove_stale_tmpdirs(workdir)
    tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=workdir))
    (tmpdir / OWNER_FILE).write_text(f"{os.getpid()}\n")
    log(f"temp dir {tmpdir}")
    return tmpdir


def close_tmpdir(tmpdir: Path, keep: bool) -> None:
    """Stops every child still running, then removes (or keeps) the temp dir."""
    stop_all()
    if keep:
        log(f"kept {tmpdir}")
    else:
        shutil.rmtree(tmpdir, ignore_errors=True)


def evict(path: Path) -> None:
    """Write back and drop this file's page cache (per file, no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def proc_cpu_seconds(pids: list[int]) -> float:
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def compare_files(a: Path, b: Path, n: int) -> tuple[bool, Optional[int], float]:
    """(identical, first differing byte or None, seconds) over the first n bytes."""
    t0 = time.monotonic()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while off < n:
            want = min(8 * MiB, n - off)
            ba, bb = fa.read(want), fb.read(want)
            if ba != bb or len(ba) != want:
                where = off + next((i for i, (x, y) in enumerate(zip(ba, bb)) if x != y),
                                   min(len(ba), len(bb)))
                return False, where, time.monotonic() - t0
            off += want
    return True, None, time.monotonic() - t0

