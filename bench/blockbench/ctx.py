"""The run context handed to every server variant and scenario, and blockd's
config writer."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from .common import EXPORT, GiB, BenchError, fmt_size, log, shlex_join
from .procs import Child, _child_setup, evict, run_bounded, spawn, sync_file


def write_blockd_config(path: Path, nodes: list[dict], resource: dict) -> None:
    """Minimal TOML writer for blockd's config (strings, ints, bools only)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        return json.dumps(str(v))  # TOML basic strings accept JSON escapes
    out = ["[resource]"] + [f"{k} = {val(v)}" for k, v in resource.items()]
    for n in nodes:
        out += ["", "[[node]]"] + [f"{k} = {val(v)}" for k, v in n.items()]
    path.write_text("\n".join(out) + "\n")


class Ctx:
    """What a server variant or a scenario gets: the arguments, the temp dir,
    the binaries, and helpers to make disks, ports and processes."""

    def __init__(self, args, tmpdir: Path, blockd_bin: Optional[Path],
                 blockctl_bin: Optional[Path] = None):
        self.args = args
        self.tmpdir = tmpdir
        self.transport = args.transport
        self.size = args.size
        self.blockd_bin = blockd_bin
        self.blockctl_bin = blockctl_bin
        self.prefill_cmds: list[str] = []
        self.wan_proxy: Optional[Path] = None   # --preset wan: the delay proxy binary

    def server_dir(self, label: str) -> Path:
        d = self.tmpdir / re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        d.mkdir(exist_ok=True)
        return d

    def spawn(self, name: str, cmd: list[str], log_path: Path) -> Child:
        return spawn(name, cmd, log_path)

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def uri(self, endpoint) -> str:
        kind, where = endpoint
        if kind == "tcp":
            return f"nbd://127.0.0.1:{where}/{EXPORT}"
        return f"nbd+unix:///{EXPORT}?socket={where}"

    def make_disk(self, label: str, suffix: str = "", size: Optional[int] = None) -> Path:
        """A fresh file of `size` (default --size) bytes, fully written once (not
        sparse), synced, and dropped from the page cache."""
        size = size or self.size
        path = self.server_dir(label) / f"disk{suffix}.img"
        cmd = ["fio", "--name=prefill", f"--filename={path}", "--rw=write", "--bs=1M",
               f"--size={size}", "--ioengine=psync", "--end_fsync=1",
               "--randrepeat=0", "--output-format=terse"]
        self.prefill_cmds.append(shlex_join(cmd))
        log(f"{label}: preallocating {fmt_size(size)} at {path}")
        run_bounded(f"{label}/prefill", cmd, path.with_suffix(".prefill.log"),
                    timeout=120 + 120 * size / GiB)
        st = path.stat()
        if st.st_size != size or st.st_blocks * 512 < size:
            raise BenchError(f"prefill of {path} left size={st.st_size} "
                             f"allocated={st.st_blocks * 512}, expected {size}")
        evict(path)
        return path

    def copy_disk(self, src: Path, label: str, suffix: str) -> Path:
        """A byte-for-byte, fully allocated copy of src (for the second node of a
        pair: same content on both disks), synced and dropped from the cache."""
        path = self.server_dir(label) / f"disk{suffix}.img"
        cmd = ["cp", "--reflink=never", "--sparse=never", str(src), str(path)]
        log(f"{label}: copying {src.name} to {path.name}")
        run_bounded(f"{label}/copy", cmd, path.with_suffix(".copy.log"),
                    timeout=120 + 120 * src.stat().st_size / GiB)
        st = path.stat()
        if st.st_size != src.stat().st_size or st.st_blocks * 512 < st.st_size:
            raise BenchError(f"copy {path} has size={st.st_size} allocated={st.st_blocks * 512}")
        sync_file(path)
        evict(path)
        evict(src)
        return path

    def blockctl(self, cfg: Path, node: str, verb: list[str],
                 timeout: float = 30) -> tuple[int, str, str]:
        """Runs blockctl (bounded); returns (exit code, stdout, stderr).
        blockctl exits 0 ok, 1 refused / not running, 2 usage."""
        if self.blockctl_bin is None:
            raise BenchError("blockctl is needed but was not located")
        cmd = [str(self.blockctl_bin), "--config", str(cfg), "--node", node, *verb]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{shlex_join(cmd)} did not finish within {timeout:.0f}s")
        return r.returncode, r.stdout, r.stderr

    def blockctl_checked(self, label: str, cfg: Path, node: str, verb: list[str]) -> str:
        """Runs blockctl, fails on a non-zero exit; returns the command line."""
        rc, out, err = self.blockctl(cfg, node, verb)
        cmd = shlex_join([str(self.blockctl_bin), "--config", str(cfg), "--node", node, *verb])
        if rc != 0:
            why = {1: "refused", 2: "usage error"}.get(rc, "failed")
            raise BenchError(f"{label}: {cmd}: {why} (exit {rc}): {(err or out).strip()}")
        log(f"{label}: {' '.join(verb)} {node}: {out.strip() or 'ok'}")
        return cmd

    def wait_listening(self, endpoint, children: list[Child]) -> None:
        """Poll until the endpoint accepts a connection; fail early if a child
        exits; bounded by --start-timeout."""
        kind, where = endpoint
        deadline = time.monotonic() + self.args.start_timeout
        delay = 0.01
        while True:
            for c in children:
                if not c.alive():
                    raise BenchError(f"{c.name} exited (status {c.popen.returncode}) before "
                                     f"listening on {where}: {shlex_join(c.cmd)}\n{c.log_tail()}")
            try:
                if kind == "tcp":
                    s = socket.create_connection(("127.0.0.1", where), timeout=1)
                else:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(1)
                    s.connect(str(where))
                s.close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in children)
                raise BenchError(f"{names} not listening on {where} after "
                                 f"{self.args.start_timeout:.0f}s\n" +
                                 "\n".join(c.log_tail() for c in children))
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

