"""The WAN link of `--preset wan`, the same bed as the Rust tests'
(tests/src/wan.rs): two network namespaces joined by a veth pair, `tc tbf` on
both ends for the bandwidth (this kernel has no netem), and the tests crate's
delay proxy (`wan-proxy`, tests/src/bin/wan-proxy.rs) in alpha's namespace in
front of beta's replication address, holding every chunk RTT/2 in each
direction.  alpha dials the proxy; beta listens on its veth address.

Names: `blkb-<tag>-<pid>-a` / `-b`.  Only namespaces of that form are ever
deleted: this run's on close, and those of dead runs (their pid is gone)
before a new one is made.  The veth ends carry the names and addresses the
Rust harness uses (tests/src/netns.rs): wan-proxy only forwards to such an
address from inside a namespace whose only interfaces are `lo` and that veth."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .common import BenchError, log, shlex_join
from .ctx import Ctx
from .procs import Child, capture

ADDRS = ("10.251.0.1", "10.251.0.2")
PREFIX_LEN = 30
VETH = ("blkd-veth-a", "blkd-veth-b")
NS_PREFIX = "blkb-"
PROXY_READY = "wan-proxy: listening on"


def ip_bin() -> str:
    path = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip")
                                       if Path(p).is_file()), None)
    if not path:
        raise BenchError("ip not found: apt-get install -y iproute2")
    return path


def ip(*args: str, timeout: float = 30) -> str:
    return capture([ip_bin(), *args], timeout=timeout)


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def remove_stale(tag: str) -> None:
    """Deletes namespaces `blkb-<tag>-<pid>-{a,b}` whose pid is gone."""
    prefix = f"{NS_PREFIX}{tag}-"
    for line in ip("netns", "list").splitlines():
        name = (line.split() or [""])[0]
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        pid, _, side = rest.partition("-")
        if pid.isdigit() and side in ("a", "b") and not _pid_alive(int(pid)):
            log(f"removing netns {name} left by a dead run (pid {pid} is gone)")
            try:
                ip("netns", "del", name)
            except BenchError as e:
                log(f"warning: {e}")


class WanNet:
    """Two namespaces, the veth pair, tbf both ways.  close() deletes them (the
    processes inside must be stopped first; bench/run's children are)."""

    def __init__(self, tag: str, rate_mbit: int):
        if os.geteuid() != 0:
            raise BenchError("--preset wan needs root (network namespaces, veth, tc)")
        if shutil.which("tc") is None and not Path("/usr/sbin/tc").is_file():
            raise BenchError("tc not found: apt-get install -y iproute2")
        remove_stale(tag)
        base = f"{NS_PREFIX}{tag}-{os.getpid()}"
        self.ns = (f"{base}-a", f"{base}-b")
        self.rate_mbit = rate_mbit
        self.commands: list[str] = []
        self.made: list[str] = []
        try:
            for n in self.ns:
                self._ip("netns", "add", n)
                self.made.append(n)
            self._ip("link", "add", VETH[0], "netns", self.ns[0], "type", "veth",
                     "peer", "name", VETH[1], "netns", self.ns[1])
            for i in (0, 1):
                self._ip("-n", self.ns[i], "addr", "add", f"{ADDRS[i]}/{PREFIX_LEN}",
                         "dev", VETH[i])
                self._ip("-n", self.ns[i], "link", "set", "lo", "up")
                self._ip("-n", self.ns[i], "link", "set", VETH[i], "up")
                # The bucket holds 10 ms of the rate, at least 64 KiB (a GSO packet);
                # packets wait up to 400 ms before tbf drops them.
                burst = max(rate_mbit * 1_000_000 // 8 // 100, 64 << 10)
                self._ip("netns", "exec", self.ns[i], "tc", "qdisc", "replace", "dev", VETH[i],
                         "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst),
                         "latency", "400ms")
        except BaseException:
            self.close()
            raise

    def _ip(self, *args: str) -> None:
        self.commands.append(shlex_join(["ip", *args]))
        ip(*args)

    def prefix(self, i: int) -> list[str]:
        """Runs a program inside namespace i (`ip netns exec` execs it: the PID
        bench/run supervises is the program's)."""
        return [ip_bin(), "netns", "exec", self.ns[i]]

    def set_link(self, i: int, up: bool) -> None:
        """Namespace i's veth end up or down (down: the link is cut)."""
        self._ip("-n", self.ns[i], "link", "set", VETH[i], "up" if up else "down")

    def close(self) -> None:
        for n in self.made:
            try:
                ip("netns", "del", n)
            except BenchError as e:
                log(f"warning: deleting netns {n}: {e}")
        self.made = []


def start_delay_proxy(ctx: Ctx, net: WanNet, proxy_bin: Path, label: str, target_port: int,
                      one_way_ms: int) -> tuple[Child, str]:
    """wan-proxy in alpha's namespace (0), on its loopback, forwarding to beta's
    veth address; returns the child and the address alpha dials.  Ready when it
    printed its listening line (its port is not reachable from here)."""
    port = ctx.free_port()   # free here; nothing else listens in the new namespace
    listen = f"127.0.0.1:{port}"
    cmd = [*net.prefix(0), str(proxy_bin), "--listen", listen,
           "--target", f"{ADDRS[1]}:{target_port}", "--delay-ms", str(one_way_ms)]
    logp = ctx.server_dir(label) / "wan-proxy.log"
    child = ctx.spawn(f"{label}/wan-proxy", cmd, logp)
    deadline = time.monotonic() + ctx.args.start_timeout
    while PROXY_READY not in (logp.read_text(errors="replace") if logp.exists() else ""):
        if not child.alive():
            raise BenchError(f"wan-proxy exited (status {child.popen.returncode}): "
                             f"{shlex_join(cmd)}\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"wan-proxy not ready after {ctx.args.start_timeout:.0f}s\n"
                             f"{child.log_tail()}")
        time.sleep(0.02)
    return child, listen
