"""Server variants.  A variant is one table entry (ServerSpec): a name, a start
hook and the transports it supports.  The start hook gets the run context and
the instance label, may create disks (ctx.make_disk), ports (ctx.free_port),
processes (ctx.spawn), and returns a Handle.  Stopping defaults to stopping
the handle's processes in reverse start order; a variant may pass its own.

This module has the single-process variants (nbdkit, blockd standalone, with
or without TLS); replicated pairs are in pair.py and replication.py."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from .common import EXPORT, indent, log, shlex_join
from .ctx import Ctx, write_blockd_config
from .procs import Child


@dataclass
class Handle:
    label: str
    uri: str
    children: list[Child]            # everything started for this variant
    disks: list[Path]                # backing files (evicted/synced around runs)
    commands: list[str]              # exact command lines, for the report
    stop_hook: Optional[Callable[["Handle"], None]] = None
    export_size: int = 0
    # Optional hooks of variants with more than a plain server (e.g. a replicated
    # pair).  stats_hook(h) -> dict is called before and after every fio run;
    # quiesce_hook(h) -> dict runs after each fio run (before the files are
    # written back) and waits until background work the run caused is done;
    # post_stop_hook(h) runs after the children have exited.
    stats_hook: Optional[Callable[["Handle"], dict]] = None
    quiesce_hook: Optional[Callable[["Handle"], dict]] = None
    post_stop_hook: Optional[Callable[["Handle"], None]] = None
    engine: Optional[str] = None     # blockd I/O engine actually used, for the header
    extra: dict = field(default_factory=dict)   # saved under servers.<label> in the JSON
    warnings: list[str] = field(default_factory=list)  # printed under the table
    # Child name -> role for the CPU columns ("Primary", "Secondary"); children
    # without one are billed as "server".
    roles: dict[str, str] = field(default_factory=dict)

    def warn(self, msg: str) -> None:
        log(f"warning: {self.label}: {msg}")
        self.warnings.append(msg)

    def stop(self) -> None:
        if self.stop_hook:
            try:
                self.stop_hook(self)
            except Exception as e:  # noqa: BLE001 - stopping must go on
                self.warn(f"stop hook failed: {e}")
        for c in reversed(self.children):
            rc = c.stop(timeout=10)
            if rc not in (0, None, -signal.SIGTERM):
                log(f"{self.label}: {c.name} (pid {c.pid}) exited with status {rc}")
                self.warn(f"{c.name} (pid {c.pid}) exited with status {rc}")
        if self.post_stop_hook:
            self.post_stop_hook(self)


@dataclass
class ServerSpec:
    name: str
    start: Callable[["Ctx", str], Handle]
    description: str
    needs_blockd: bool = False
    transports: tuple[str, ...] = ("tcp", "unix")
    needs_blockctl: bool = False     # replicated pairs: create-md, status, primary
    disks: int = 1                   # backing files of --size it creates (free-space check)


# TLS variants: certificates come from `blockctl gen-certs`; fio (libnbd) connects
# with nbds://...?tls-verify-peer=false, because fio cannot pass libnbd a
# certificate directory (a URI naming local files needs nbd_set_uri_allow_local_file,
# which fio does not call). The session is encrypted all the same; only the check of
# the server's certificate at connect is skipped, which costs nothing per request.
TLS_URI_QUERY = "tls-verify-peer=false"


def tls_uri(port: int) -> str:
    return f"nbds://127.0.0.1:{port}/{EXPORT}?{TLS_URI_QUERY}"


def gen_certs(ctx: "Ctx", label: str, cfg: Path) -> tuple[Path, str]:
    """`blockctl gen-certs` for the config's nodes into <server dir>/tls; returns the
    directory and the command line."""
    out = ctx.server_dir(label) / "tls"
    cmd = ctx.blockctl_checked(label, cfg, "alpha", ["gen-certs", EXPORT, "--out-dir", str(out)])
    return out, cmd


def start_nbdkit(ctx: "Ctx", label: str, plugin_args: tuple[str, ...] = (), tls: bool = False) -> Handle:
    disk = ctx.make_disk(label)
    d = ctx.server_dir(label)
    if tls:
        # A one-node config only to have blockctl make the certificates; nbdkit reads
        # alpha's directory (ca-cert.pem, server-cert.pem, server-key.pem).
        port = ctx.free_port()
        cfg = d / "certs.toml"
        write_blockd_config(cfg, resource={"name": EXPORT}, nodes=[{
            "name": "alpha", "replication": f"127.0.0.1:{ctx.free_port()}",
            "nbd": f"127.0.0.1:{port}", "disk": str(disk), "meta": "internal",
            "control": str(d / "alpha.ctl")}])
        certs, gen = gen_certs(ctx, label, cfg)
        cmd = ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", EXPORT,
               "--tls=require", f"--tls-certificates={certs / 'alpha'}", "file", f"file={disk}", *plugin_args]
        child = ctx.spawn(f"{label}/nbdkit", cmd, d / "nbdkit.log")
        ctx.wait_listening(("tcp", port), [child])
        return Handle(label, tls_uri(port), [child], [disk], [gen, shlex_join(cmd)])
    if ctx.transport == "tcp":
        port = ctx.free_port()
        listen = ["-i", "127.0.0.1", "-p", str(port)]
        endpoint = ("tcp", port)
    else:
        sock = d / "nbd.sock"
        listen = ["-U", str(sock)]
        endpoint = ("unix", sock)
    cmd = ["nbdkit", "--exit-with-parent", "-f", *listen, "-e", EXPORT,
           "file", f"file={disk}", *plugin_args]
    child = ctx.spawn(f"{label}/nbdkit", cmd, d / "nbdkit.log")
    ctx.wait_listening(endpoint, [child])
    return Handle(label, ctx.uri(endpoint), [child], [disk], [shlex_join(cmd)])




def start_blockd(ctx: "Ctx", label: str, engine: str, tls: bool = False,
                 workers: Optional[int] = None) -> Handle:
    """A standalone blockd node ("alpha") with one disk, exporting r0 over TCP
    (with tls: nbd-tls = "require"; with workers: that `worker-threads`)."""
    disk = ctx.make_disk(label)
    d = ctx.server_dir(label)
    nbd_port, repl_port = ctx.free_port(), ctx.free_port()
    cfg = d / "blockd.toml"
    node = {
        "name": "alpha",
        "replication": f"127.0.0.1:{repl_port}",
        "nbd": f"127.0.0.1:{nbd_port}",
        "disk": str(disk),
        "meta": "internal",
        "control": str(d / "alpha.ctl"),
        **({"worker-threads": workers} if workers else {}),
    }
    write_blockd_config(cfg, resource={"name": EXPORT}, nodes=[node])
    pre = []
    if tls:
        certs, gen = gen_certs(ctx, label, cfg)
        pre.append(gen)
        node.update({"nbd-tls": "require", "nbd-tls-cert": str(certs / "alpha" / "server-cert.pem"),
                     "nbd-tls-key": str(certs / "alpha" / "server-key.pem")})
        write_blockd_config(cfg, resource={"name": EXPORT}, nodes=[node])
    cmd = [str(ctx.blockd_bin), "run", "--config", str(cfg), "--node", "alpha",
           "--io-engine", engine]
    child = ctx.spawn(f"{label}/blockd", cmd, d / "blockd-alpha.log")
    endpoint = ("tcp", nbd_port)
    ctx.wait_listening(endpoint, [child])
    uri = tls_uri(nbd_port) if tls else ctx.uri(endpoint)
    return Handle(label, uri, [child], [disk],
                  pre + [f"{shlex_join(cmd)}   # config {cfg}:\n" + indent(cfg.read_text())],
                  engine=resolved_engine(engine, [child]))




def resolved_engine(engine: str, children: list[Child]) -> str:
    """The engine blockd really uses: `auto` picks io_uring and logs a warning
    when it has to fall back to posix."""
    if engine != "auto":
        return engine
    for c in children:
        try:
            if "io_uring is unavailable" in c.log_path.read_text(errors="replace"):
                return "auto->posix"
        except OSError:
            return "auto->?"
    return "auto->uring"


# The single-process variants (pairs: replication.py; TLS pairs: tls.py).
SERVERS_SINGLE = [
    ServerSpec("nbdkit", start_nbdkit,
               "nbdkit file plugin (page cache, default threads)"),
    ServerSpec("blockd-posix", partial(start_blockd, engine="posix"),
               "blockd standalone, --io-engine posix", needs_blockd=True, transports=("tcp",)),
    ServerSpec("blockd-uring", partial(start_blockd, engine="uring"),
               "blockd standalone, --io-engine uring", needs_blockd=True, transports=("tcp",)),
    ServerSpec("blockd-standalone", partial(start_blockd, engine="auto"),
               "blockd standalone (single node), --io-engine auto; the replication baseline",
               needs_blockd=True, transports=("tcp",)),
    ServerSpec("blockd-standalone-w2", partial(start_blockd, engine="auto", workers=2),
               "blockd standalone, worker-threads = 2 (a standalone export's default is 1)",
               needs_blockd=True, transports=("tcp",)),
]
