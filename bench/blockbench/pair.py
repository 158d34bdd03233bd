"""blockd nodes driven like an operator would: a replicated pair alpha (Primary,
fio talks to it) + beta (Secondary), or one standalone node, started with
`blockd run` in the foreground (owned by bench/run), controlled and watched
with `blockctl`.

`Nodes` is the one implementation: the pair variants of the main table
(`start_blockd_pair` and its hooks), the resync scenario and the wan scenario
all use it.  By default both nodes are on 127.0.0.1 with fresh ports; a
scenario may run each node under a command prefix (`ip netns exec NS`), give
each its replication address, export NBD on a Unix socket (reachable from
every network namespace), and let alpha dial beta at another address (a
delay proxy in front of beta)."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from .common import EXPORT, BenchError, fmt_size, indent, log, shlex_join
from .ctx import Ctx, write_blockd_config
from .procs import Child, capture, compare_files, evict
from .servers import Handle, gen_certs, resolved_engine

PAIR_NODES = ("alpha", "beta")
QUIESCE_TIMEOUT = 60.0
POLL_S = 0.05                 # status polling interval while timing something


def peer(st: Optional[dict]) -> dict:
    """`peers[0]` of a status (an empty dict when there is none)."""
    try:
        return (st or {}).get("peers", [{}])[0] or {}
    except (IndexError, AttributeError):
        return {}


def established(sts: dict[str, Optional[dict]]) -> bool:
    return all(peer(sts[n]).get("replication") == "Established" for n in PAIR_NODES)


class Nodes:
    """blockd nodes of one variant or scenario (a pair alpha+beta, or one
    standalone node) that can be stopped, reconfigured and started again on the
    same disks."""

    def __init__(self, ctx: Ctx, label: str, disks: dict[str, Path], engine: str = "auto",
                 prefix: Optional[dict[str, list[str]]] = None, nbd_unix: bool = False):
        self.ctx, self.label, self.disks, self.engine = ctx, label, disks, engine
        self.names = list(disks)
        self.pair = len(self.names) == 2
        self.prefix = prefix or {}
        self.nbd_unix = nbd_unix
        self.dir = ctx.server_dir(label)
        self.cfg = self.dir / "blockd.toml"
        self.cfgs = {n: self.cfg for n in self.names}
        self.kids: list[Child] = []
        self.commands: list[str] = []
        self.resource: dict = {}
        self.uri = ""
        self.endpoint: tuple = ()
        self.export_size = 0
        self.warnings: list[str] = []
        self.final_status: dict = {}
        self.start_status: dict = {}
        self.established_after_s: Optional[float] = None

    def warn(self, msg: str) -> None:
        log(f"warning: {self.label}: {msg}")
        self.warnings.append(msg)

    @property
    def roles(self) -> dict[str, str]:
        """Child name -> role, for the CPU columns (a pair: alpha is Primary)."""
        if not self.pair:
            return {}
        return {f"{self.label}/alpha": "Primary", f"{self.label}/beta": "Secondary"}

    def configure(self, resource: dict, node_extra: Optional[dict[str, dict]] = None,
                  addrs: Optional[dict[str, str]] = None,
                  dial: Optional[dict[str, str]] = None) -> None:
        """(Re)writes the config; fresh ports every time.  `resource` adds to
        [resource] (a pair is protocol C unless it says otherwise); `node_extra`
        adds keys to a node's [[node]]; `addrs` gives a node's replication
        address (default 127.0.0.1 and a free port); `dial` = {node: address}
        gives that node a config of its own in which its peer's replication
        address is `address` (where it dials; the peer still listens at its own)."""
        self.resource = {"name": EXPORT, **({"protocol": "C"} if self.pair else {}), **resource}
        self.nbd_ports: dict[str, int] = {}
        nodes = []
        for n in self.names:
            if self.nbd_unix:
                nbd = f"unix:{self.dir / f'{n}.nbd'}"
            else:
                self.nbd_ports[n] = self.ctx.free_port()
                nbd = f"127.0.0.1:{self.nbd_ports[n]}"
            repl = (addrs or {}).get(n) or f"127.0.0.1:{self.ctx.free_port()}"
            nodes.append({"name": n, "replication": repl, "nbd": nbd, "disk": str(self.disks[n]),
                          "meta": "internal", "control": str(self.dir / f"{n}.ctl"),
                          **(node_extra or {}).get(n, {})})
        write_blockd_config(self.cfg, nodes=nodes, resource=self.resource)
        self.cfgs = {n: self.cfg for n in self.names}
        self.commands.append(f"# config {self.cfg}:\n" + indent(self.cfg.read_text()))
        for n, addr in (dial or {}).items():
            own = [dict(x, replication=addr) if x["name"] != n else x for x in nodes]
            self.cfgs[n] = self.dir / f"blockd-{n}.toml"
            write_blockd_config(self.cfgs[n], nodes=own, resource=self.resource)
            self.commands.append(f"# {n}'s own config {self.cfgs[n]}: the same, but it dials "
                                 f"its peer at {addr}")

    def blockctl(self, node: str, verb: list[str], timeout: float = 30) -> tuple[int, str, str]:
        return self.ctx.blockctl(self.cfgs[node], node, verb, timeout=timeout)

    def checked(self, node: str, verb: list[str]) -> None:
        self.commands.append(self.ctx.blockctl_checked(self.label, self.cfgs[node], node, verb))

    def status(self, node: str = "alpha", timeout: float = 10) -> Optional[dict]:
        """`blockctl status --json` of one node; None while it does not answer
        (exit 1); BenchError on a usage error (exit 2) or garbage."""
        rc, out, err = self.blockctl(node, ["status", "--json"], timeout=timeout)
        if rc == 0:
            try:
                return json.loads(out)
            except ValueError:
                raise BenchError(f"blockctl status --json for {node} printed non-JSON: "
                                 f"{out[:200]!r}")
        if rc == 1:
            return None
        raise BenchError(f"blockctl --config {self.cfgs[node]} --node {node} status --json: "
                         f"exit {rc}: {err.strip()}")

    def statuses(self) -> dict[str, Optional[dict]]:
        return {n: self.status(n) for n in self.names}

    def create_md(self, *flags: str) -> None:
        for n in self.names:
            self.checked(n, ["create-md", *flags])

    def alive_check(self, what: str) -> None:
        for c in self.kids:
            if not c.alive():
                raise BenchError(f"{c.name} exited (status {c.popen.returncode}) {what}: "
                                 f"{shlex_join(c.cmd)}\n{c.log_tail(30)}")

    def wait_all(self, what: str, ok: Callable[[dict[str, Optional[dict]]], bool],
                 timeout: float) -> dict:
        """Polls every node's status until ok(statuses) holds; fails at once if a
        node exits, and with the statuses and log tails at the deadline."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            self.alive_check(f"while waiting for {what}")
            sts = self.statuses()
            if ok(sts):
                return sts
            if time.monotonic() > deadline:
                detail = "\n".join(f"  {n} status: {json.dumps(sts[n])}" for n in self.names)
                tails = "\n".join(f"  {c.name} log ({c.log_path}):\n{c.log_tail(30)}"
                                  for c in self.kids)
                raise BenchError(f"{self.label}: no {what} after {timeout:.0f}s\n{detail}\n{tails}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def wait_alpha(self, what: str, ok: Callable[[dict], bool], timeout: float) -> dict:
        """Polls alpha's status every POLL_S until ok(status) holds (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            self.alive_check(f"while waiting for {what}")
            st = self.status("alpha") or {}
            if ok(st):
                return st
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: no {what} after {timeout:.0f}s; alpha status: "
                                 f"{json.dumps(st)}")
            time.sleep(POLL_S)

    def start(self, primary: bool = True) -> None:
        """Starts the nodes (beta first); for a pair, waits until both are
        Established and makes alpha Primary."""
        self.kids = []
        for n in reversed(self.names):   # beta first; stopped in reverse: alpha first
            cmd = [*self.prefix.get(n, []), str(self.ctx.blockd_bin), "run",
                   "--config", str(self.cfgs[n]), "--node", n, "--io-engine", self.engine]
            logp = self.dir / f"blockd-{n}.log"
            self.kids.append(self.ctx.spawn(f"{self.label}/{n}", cmd, logp))
            self.commands.append(f"{shlex_join(cmd)}   # log {logp}")
        if self.nbd_unix:
            self.endpoint = ("unix", self.dir / "alpha.nbd")
        else:
            self.endpoint = ("tcp", self.nbd_ports["alpha"])
        if self.pair:
            t0 = time.monotonic()
            self.wait_all("control socket answer from both nodes",
                          lambda sts: all(sts[n] is not None for n in PAIR_NODES),
                          self.ctx.args.start_timeout)
            sts = self.wait_all("replication Established on both nodes", established,
                                self.ctx.args.start_timeout)
            self.established_after_s = time.monotonic() - t0
            self.start_status = dict(sts)
            if not primary:
                return
            self.checked("alpha", ["primary"])
            self.ctx.wait_listening(self.endpoint, self.kids)
            st = self.status("alpha")
            if not st or st.get("role") != "Primary":
                raise BenchError(f"{self.label}: alpha is not Primary after `blockctl primary`: "
                                 f"{json.dumps(st)}")
            self.start_status["alpha"] = st
            log(f"{self.label}: protocol {self.resource.get('protocol')}, Established after "
                f"{self.established_after_s:.2f}s; alpha Primary (peer disk as alpha sees it: "
                f"{peer(st).get('disk')})")
        else:
            self.ctx.wait_listening(self.endpoint, self.kids)
        self.uri = self.ctx.uri(self.endpoint)
        self.export_size = int(capture(["nbdinfo", "--size", self.uri], timeout=30).strip())
        log(f"{self.label}: {self.uri} export size {self.export_size}")

    def compare(self) -> tuple[bool, Optional[int], float]:
        """Whether alpha's and beta's data regions are byte-identical: (same, first
        differing byte, seconds); logs the result, warns if they differ."""
        same, where, secs = compare_files(self.disks["alpha"], self.disks["beta"],
                                          self.export_size)
        if same:
            log(f"{self.label}: alpha and beta data regions identical "
                f"({fmt_size(self.export_size)} compared, {secs:.1f}s)")
        else:
            self.warn(f"alpha and beta differ at byte {where} of the "
                      f"{self.export_size}-byte data region")
        return same, where, secs

    def stop(self, compare: bool = True) -> Optional[bool]:
        """Stops the nodes (alpha first); for a pair that exited cleanly, returns
        whether the two data regions are identical (None: not compared)."""
        started = bool(self.kids)
        if self.pair and started:
            try:
                self.final_status = self.statuses()
            except BenchError as e:
                self.warn(f"final status: {e}")
        ok = True
        for c in reversed(self.kids):
            rc = c.stop(timeout=10)
            if rc != 0:
                ok = False
                self.warn(f"{c.name} (pid {c.pid}) exited with status {rc}")
        self.kids = []
        if not (self.pair and compare and started):
            return None
        if not ok:
            self.warn("a node did not exit cleanly; disks not compared")
            return None
        return self.compare()[0]

    def evict(self) -> None:
        for dsk in self.disks.values():
            evict(dsk)

    def stats(self) -> dict:
        """The figures of alpha's status a run is judged by."""
        st = self.status("alpha")
        p = peer(st)
        return {"replicated_bytes": p.get("replicated_bytes"), "replication": p.get("replication"),
                "connection": p.get("connection"), "out_of_sync_bytes": p.get("out_of_sync_bytes"),
                "unsent_bytes": (st or {}).get("unsent_bytes"), "role": (st or {}).get("role")}

    def quiesce(self, timeout: float = QUIESCE_TIMEOUT) -> dict:
        """After a run: wait (bounded) until alpha has handed every queued frame
        to the socket and nothing is out of sync, so protocol A's backlog is not
        billed to the next server.  Returns how long that took and the last
        figures."""
        t0 = time.monotonic()
        delay = 0.01
        while True:
            s = self.stats()
            if (s["replication"] == "Established" and s["unsent_bytes"] == 0
                    and s["out_of_sync_bytes"] == 0):
                return {"drain_s": time.monotonic() - t0, "quiet": True, **s}
            if time.monotonic() - t0 > timeout:
                return {"drain_s": time.monotonic() - t0, "quiet": False, **s}
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


# --------------------------------------------------------------------------
# The pair variants of the main table: each node has its own copy of the same
# prefilled file, internal metadata created with --clear-bitmap (the copies are
# identical, so no initial sync).

def start_blockd_pair(ctx: Ctx, label: str, protocol: str, engine: str = "auto",
                      tls: bool = False, workers: Optional[int] = None) -> Handle:
    # One prefill, then a byte-for-byte copy: --clear-bitmap below tells blockd the
    # two disks are identical, which must be true.
    disk_a = ctx.make_disk(label, "-alpha")
    disk_b = ctx.copy_disk(disk_a, label, "-beta")
    p = Nodes(ctx, label, {"alpha": disk_a, "beta": disk_b}, engine=engine)
    resource = {"protocol": protocol}
    per_node = {n: {"worker-threads": workers} for n in PAIR_NODES} if workers else {}
    p.configure(resource, node_extra=per_node)
    pre = []
    if tls:
        # Mutual TLS 1.3 on the peer link; the NBD side (fio) stays plaintext.
        certs, gen = gen_certs(ctx, label, p.cfg)
        pre.append(gen)
        p.commands = []
        p.configure({**resource, "tls-ca": str(certs / "ca-cert.pem")}, node_extra={
            n: {**per_node.get(n, {}), "tls-cert": str(certs / n / "server-cert.pem"),
                "tls-key": str(certs / n / "server-key.pem")} for n in PAIR_NODES})
    p.commands = pre + p.commands + [
        f"{ctx.prefill_cmds[-1]}   # alpha's file",
        shlex_join(["cp", "--reflink=never", "--sparse=never", str(disk_a), str(disk_b)])
        + "   # beta's file: the same bytes"]
    p.create_md("--clear-bitmap")
    p.start()
    h = Handle(label, p.uri, p.kids, [disk_a, disk_b], p.commands,
               engine=resolved_engine(engine, p.kids),
               roles=p.roles)
    h.extra = {"kind": "pair", "protocol": protocol, "config": str(p.cfg), "tls": tls,
               "established_after_s": round(p.established_after_s or 0, 3),
               "status_at_start": p.start_status}
    h.stats_hook = lambda h: p.stats()
    h.quiesce_hook = lambda h: p.quiesce()
    h.stop_hook = partial(_pair_final, p)
    h.post_stop_hook = partial(_pair_verify, ctx, p)
    return h


def _pair_final(p: Nodes, h: Handle) -> None:
    """Before stopping: both nodes' full `status --json`, saved in the results."""
    h.extra["status_at_end"] = p.statuses()
    pe = peer(h.extra["status_at_end"]["alpha"])
    log(f"{h.label}: alpha replicated_bytes {pe.get('replicated_bytes')} "
        f"({pe.get('replication')}, out_of_sync {pe.get('out_of_sync_bytes')})")
    if pe.get("replication") != "Established":
        h.warn(f"alpha's link to beta is {pe.get('replication')!r} at the end of the run")


def _pair_verify(ctx: Ctx, p: Nodes, h: Handle) -> None:
    """After both nodes stopped cleanly: the exported data regions of the two
    disks must be byte-identical (proof that every write reached the peer)."""
    if ctx.args.no_verify_pair:
        return
    if any(c.popen.returncode != 0 for c in h.children):
        h.extra["peer_identical"] = None
        h.warn("a node did not exit cleanly; disks not compared")
        return
    p.export_size = h.export_size
    same, where, secs = p.compare()
    if not same:
        h.warnings.append(p.warnings.pop())
    h.extra["peer_identical"] = same
    h.extra["peer_compare"] = {"bytes": h.export_size, "first_difference": where,
                               "seconds": round(secs, 2)}
