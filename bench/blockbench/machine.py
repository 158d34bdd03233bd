"""The tools and binaries a run needs (installing or building them), and the
machine description printed in every header."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .common import REPO_DIR, BenchError, log, shlex_join
from .procs import capture, fs_of


def ensure_tools() -> None:
    need = {"fio": "fio", "nbdkit": "nbdkit", "nbdinfo": "libnbd-bin"}
    missing = [pkg for tool, pkg in need.items() if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(f"missing tools; install: apt-get install -y {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "fio", "nbdkit", "libnbd-bin"]
        log(f"installing: {' '.join(cmd)}")
        r = subprocess.run(cmd, env=env, timeout=900, stdout=sys.stderr)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, timeout=900, stdout=sys.stderr)
            r = subprocess.run(cmd, env=env, timeout=900, stdout=sys.stderr)
        still = [t for t in need if shutil.which(t) is None]
        if r.returncode != 0 or still:
            raise BenchError(f"could not install {still or missing} (apt-get exit {r.returncode})")
    r = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or "uri" not in r.stdout:
        raise BenchError("this fio has no nbd ioengine (Debian's fio >= 3.19 has it)")


def resolve_blockd(args, specs: list) -> tuple[Optional[Path], Optional[Path]]:
    """(blockd, blockctl) binaries; builds both unless told not to.  blockctl is
    only required by variants that need it (replicated pairs)."""
    if not any(s.needs_blockd for s in specs):
        return None, None
    explicit = args.blockd_bin or os.environ.get("BLOCKD_BIN")
    if explicit:
        path = Path(explicit)
    else:
        target = Path(args.target_dir or os.environ.get("CARGO_TARGET_DIR") or REPO_DIR / "target")
        if not target.is_absolute():
            target = REPO_DIR / target
        path = target / "release" / "blockd"
        if not args.no_build:
            if shutil.which("cargo") is None:
                raise BenchError("cargo not found; build blockd yourself and pass --no-build "
                                 "(or set BLOCKD_BIN), or use --only nbdkit")
            cmd = ["cargo", "build", "--release", "-p", "blockd", "-p", "blockctl"]
            log(f"building: {shlex_join(cmd)}")
            try:
                r = subprocess.run(cmd, cwd=REPO_DIR, stdout=sys.stderr, timeout=3600,
                                   env=dict(os.environ, CARGO_TARGET_DIR=str(target)))
            except subprocess.TimeoutExpired:
                raise BenchError("cargo build timed out after 3600s")
            if r.returncode != 0:
                raise BenchError(f"cargo build failed (exit {r.returncode}); fix the build, "
                                 "or use --only nbdkit")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise BenchError(f"blockd binary not found at {path} (needed by "
                         f"{', '.join(s.name for s in specs if s.needs_blockd)}); build it, set "
                         "BLOCKD_BIN, or run with --only nbdkit")
    blockd = path.resolve()
    if not any(s.needs_blockctl for s in specs):
        return blockd, None
    explicit = args.blockctl_bin or os.environ.get("BLOCKCTL_BIN")
    # Default: next to blockd, same naming (target/release/blockctl,
    # bench/lib/fake-blockctl next to bench/lib/fake-blockd).
    ctl = Path(explicit) if explicit else path.parent / path.name.replace("blockd", "blockctl")
    if not (ctl.is_file() and os.access(ctl, os.X_OK)):
        raise BenchError(f"blockctl binary not found at {ctl} (needed by "
                         f"{', '.join(s.name for s in specs if s.needs_blockctl)}); build it "
                         "(cargo build --release -p blockctl) or set BLOCKCTL_BIN")
    return blockd, ctl.resolve()


def first_line(cmd: list[str]) -> str:
    try:
        return capture(cmd, timeout=10).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001 - informational only
        return f"? ({e})"


def machine_info(args, blockd_bin: Optional[Path], workdir: Path) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, AttributeError):
        pass
    libnbd = "?"
    try:
        out = capture(["nbdinfo", "--version"], timeout=10)
        m = re.search(r"libnbd\s+(\S+)", out)
        libnbd = m.group(1) if m else out.strip()
    except Exception:  # noqa: BLE001
        pass
    blockd = None
    if blockd_bin:
        rev = "?"
        try:
            rev = capture(["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"]).strip()
        except Exception:  # noqa: BLE001
            pass
        mtime = _dt.datetime.fromtimestamp(blockd_bin.stat().st_mtime).isoformat(timespec="seconds")
        blockd = f"{blockd_bin} (repo {rev}, built {mtime})"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "cpu": cpu,
        "mem": mem,
        "kernel": platform.release(),
        "fio": first_line(["fio", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "libnbd": libnbd,
        "blockd": blockd,
        "workdir": f"{workdir} ({fs_of(workdir)})",
        "load_start": loadavg(),
    }


def load_range(raw_runs: list[dict]) -> str:
    """', 1-min loadavg before the runs: min-max' (the machine is shared)."""
    vals = []
    for r in raw_runs:
        try:
            vals.append(float(r["loadavg_before"].split()[0]))
        except (KeyError, ValueError, IndexError):
            pass
    return f", 1-min loadavg before each run {min(vals):.2f}-{max(vals):.2f}" if vals else ""


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"

