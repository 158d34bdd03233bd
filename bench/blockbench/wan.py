"""--preset wan: replication over a WAN link (default 100 Mbit/s, 40 ms RTT; the
bed of netns.py).  A scenario (scenario.py) with three parts, each a table:

- throughput: fio seqwrite / randwrite through NBD on alpha (protocol A), with
  the daemon's default congestion policy (`block`) and with
  `on-congestion = "pull-ahead"` + `congestion-fill`: what the application
  gets, how long the link needs to catch up afterwards, the states seen;
- compression: a fixed amount of half-compressible data (fio
  buffer_compress_percentage=50) with compression off (the default) and
  `compression = "zstd"`: the ratio of bytes on the wire to payload
  (`sent_wire_bytes` / (`replicated_bytes` + `resync_sent_bytes`) of alpha's
  peer), CPU of both daemons per MiB, time until in sync;
- catchup: cut the link (alpha's veth down), write for --outage seconds, heal,
  and time until alpha sees its peer Established, UpToDate, 0 out of sync.

Every variant is a fresh pair in fresh namespaces.  Keys of issue 15 that a
daemon does not know are a config error (exit 2): that variant's row says so,
the part ends FAILED with the daemon's message, and the other variants run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .common import GiB, MiB, REPO_DIR, BenchError, fmt_cpu_us, fmt_num, fmt_roles_us, \
    fmt_size, log, parse_size, render_rows, shlex_join
from .ctx import Ctx
from .fio import JOBS, fio_cmd, run_fio_measured
from .netns import ADDRS, WanNet, start_delay_proxy
from .pair import POLL_S, Nodes, peer
from .procs import Child, proc_cpu_seconds, run_bounded
from .scenario import Part, finish, machine_header, parse_parts, run_scenario

SCENARIO = ("replication over a WAN link (namespaces, tc tbf, delay proxy; --wan-rate-mbit, "
            "--wan-rtt-ms): app write throughput with on-congestion block vs pull-ahead, "
            "compression off vs zstd (ratio, CPU per MiB), catch-up after an outage "
            "(--parts throughput,compression,catchup)")
WAN_PARTS = ("throughput", "compression", "catchup")
REPL_PORT = 7789
# Off loopback the peers must authenticate (SPEC §6).
SECRET = "blockd bench wan pair secret 0123456789"
SAMPLE_S = 0.5                # status sampling while a run goes on


class Unsupported(BenchError):
    """The daemon rejected a config key or value of this variant."""


def add_args(g) -> None:
    g.add_argument("--wan-rate-mbit", type=int, default=100,
                   help="bandwidth of each direction, Mbit/s (tc tbf; default 100)")
    g.add_argument("--wan-rtt-ms", type=int, default=40,
                   help="round-trip time added by the delay proxy, ms (half each way; default 40)")
    g.add_argument("--wan-size", type=parse_size, default=GiB,
                   help="each node's device (a sparse file; default 1G)")
    g.add_argument("--wan-jobs", default="seqwrite,randwrite",
                   help="fio jobs of the throughput part (default seqwrite,randwrite)")
    g.add_argument("--congestion-fill", type=parse_size, default=64 * MiB,
                   help="congestion-fill of the pull-ahead runs (default 64M)")
    g.add_argument("--compress-bytes", type=parse_size, default=256 * MiB,
                   help="bytes written in each compression run (default 256M)")
    g.add_argument("--compression-level", type=int, default=None,
                   help="compression-level of the zstd run (default: the daemon's)")
    g.add_argument("--outage", type=int, default=30,
                   help="seconds of writes while the link is cut (default 30)")
    g.add_argument("--outage-rate", default="4m",
                   help="fio --rate of the writer during the outage (4k random writes; "
                        "default 4m; 0 = unlimited)")
    g.add_argument("--wan-timeout", type=float, default=600,
                   help="bound on waiting for a pair to be in sync again (default 600 s)")
    g.add_argument("--wan-proxy-bin", default=None,
                   help="the delay proxy (default $WAN_PROXY_BIN, else wan-proxy next to blockd; "
                        "built with cargo build --release -p blockd-tests --bin wan-proxy)")


def resolve_proxy(ctx: Ctx) -> Path:
    """The wan-proxy binary: --wan-proxy-bin, $WAN_PROXY_BIN, or next to blockd
    (built there unless --no-build or an explicit blockd binary)."""
    a = ctx.args
    explicit = a.wan_proxy_bin or os.environ.get("WAN_PROXY_BIN")
    path = Path(explicit) if explicit else ctx.blockd_bin.parent / "wan-proxy"
    if not explicit and not a.no_build and not (a.blockd_bin or os.environ.get("BLOCKD_BIN")):
        cmd = ["cargo", "build", "--release", "-p", "blockd-tests", "--bin", "wan-proxy"]
        log(f"building: {shlex_join(cmd)}")
        r = subprocess.run(cmd, cwd=REPO_DIR, stdout=sys.stderr, timeout=3600,
                           env=dict(os.environ, CARGO_TARGET_DIR=str(path.parent.parent)))
        if r.returncode != 0:
            raise BenchError(f"cargo build of wan-proxy failed (exit {r.returncode})")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise BenchError(f"wan-proxy not found at {path}: cargo build --release -p blockd-tests "
                         "--bin wan-proxy, or pass --wan-proxy-bin")
    return path


class WanPair:
    """A protocol A pair over a fresh WAN bed: alpha in namespace 0, beta in 1,
    NBD on Unix sockets (reachable from here), alpha dialing the delay proxy."""

    def __init__(self, ctx: Ctx, label: str, resource: dict):
        a = ctx.args
        self.ctx, self.label, self.resource = ctx, label, resource
        self.net = WanNet("wan", a.wan_rate_mbit)
        self.proxy: Optional[Child] = None
        self.p: Optional[Nodes] = None
        try:
            d = ctx.server_dir(label)
            disks = {}
            for n in ("alpha", "beta"):
                disks[n] = d / f"disk-{n}.img"
                with open(disks[n], "wb") as f:
                    f.truncate(a.wan_size)
            self.proxy, dial = start_delay_proxy(ctx, self.net, ctx.wan_proxy, label, REPL_PORT,
                                                 a.wan_rtt_ms // 2)
            p = self.p = Nodes(ctx, label, disks, prefix={"alpha": self.net.prefix(0),
                                                          "beta": self.net.prefix(1)},
                               nbd_unix=True)
            p.configure({"protocol": "A", "shared-secret": SECRET, **resource},
                        addrs={n: f"{ADDRS[i]}:{REPL_PORT}" for i, n in enumerate(p.names)},
                        dial={"alpha": dial})
            p.commands = self.net.commands + [shlex_join(self.proxy.cmd)] + p.commands
            try:
                p.create_md("--clear-bitmap")
                p.start()
            except BenchError as e:
                if resource and ("unknown key" in str(e) or "unknown variant" in str(e)):
                    keys = ", ".join(f"{k} = {json.dumps(v)}" for k, v in resource.items())
                    m = re.search(r"key `[^`]+`: unknown (key|variant)[^\n]*", str(e))
                    why = m.group(0) if m else str(e).strip().splitlines()[0]
                    raise Unsupported(f"this blockd rejects `{keys}` (config error, exit 2): {why}. "
                                      "These keys come with issue 15 (compression, "
                                      "pull-ahead); build a blockd that has them.") from None
                raise
        except BaseException:
            self.close()
            raise

    def stats(self) -> dict:
        """alpha's peer counters (None where the daemon does not report one)."""
        st = self.p.status("alpha") or {}
        pe = peer(st)
        return {k: pe.get(k) for k in ("replicated_bytes", "resync_sent_bytes", "sent_wire_bytes",
                                       "out_of_sync_bytes", "replication", "connection", "disk")} \
            | {"unsent_bytes": st.get("unsent_bytes")}

    def in_sync(self, after: str) -> dict:
        """Waits (bounded by --wan-timeout) until alpha reports Established,
        unsent 0, out_of_sync 0 (Nodes.quiesce); warns if it did not happen."""
        q = self.p.quiesce(timeout=self.ctx.args.wan_timeout)
        if not q["quiet"]:
            self.p.warn(f"not in sync {q['drain_s']:.0f}s after {after}: {q}")
        return q

    def finish(self, res: dict, row: dict, name: Optional[str]) -> None:
        """After a row: stops everything (close), records whether the copies are
        identical, the warnings (prefixed with the row's name) and the commands,
        and removes the row's files."""
        row["identical"] = self.close()
        if self.p is not None:
            res["warnings"] += [f"{name}: {x}" if name else x for x in self.p.warnings]
            res["commands"] += self.p.commands
        shutil.rmtree(self.ctx.server_dir(self.label), ignore_errors=True)

    def close(self) -> Optional[bool]:
        """Stops the nodes and the proxy, deletes the namespaces; returns whether
        the copies are identical (None: not compared)."""
        same = None
        try:
            if self.p is not None:
                same = self.p.stop(compare=not self.ctx.args.no_verify_pair)
        finally:
            if self.proxy is not None:
                self.proxy.stop(timeout=10)
            self.net.close()
        return same


class Sampler:
    """Polls alpha's status every SAMPLE_S on a thread while a run goes on: the
    replication states seen, the largest out_of_sync and unsent figures."""

    def __init__(self, w: WanPair):
        self.w, self.samples = w, []
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self.t.start()

    def _run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                s = self.w.stats()
                self.samples.append({"t": round(time.monotonic() - self.t0, 2), **s})
            except BenchError:
                pass
            self.stop_ev.wait(SAMPLE_S)

    def stop(self) -> dict:
        self.stop_ev.set()
        self.t.join(30)
        states = []
        for s in self.samples:
            if s.get("replication") and s["replication"] not in states:
                states.append(s["replication"])
        return {"states": states,
                "max_out_of_sync": max((s.get("out_of_sync_bytes") or 0 for s in self.samples),
                                       default=None),
                "max_unsent": max((s.get("unsent_bytes") or 0 for s in self.samples), default=None),
                "samples": self.samples}


def delta(before: dict, after: dict, key: str) -> Optional[int]:
    a, b = before.get(key), after.get(key)
    return b - a if isinstance(a, int) and isinstance(b, int) else None


def run_variants(res: dict, variants: list[tuple], one) -> None:
    """Runs one(name, resource, *rest) per variant (name, resource, *rest); an
    Unsupported variant is recorded and the rest still run; the part then fails
    with the daemon's message."""
    unsupported = []
    for name, resource, *rest in variants:
        try:
            res["rows"].append(one(name, resource, *rest))
        except Unsupported as e:
            log(f"{name}: {e}")
            res["rows"].append({"name": name, "unsupported": str(e),
                                "job": rest[0].title if rest else ""})
            if str(e) not in unsupported:
                unsupported.append(str(e))
    if unsupported:
        raise BenchError("; ".join(unsupported))


def variant_rows(res: dict, ncols: int, lead: int, fmt) -> tuple[list, list]:
    """The table rows, fmt(row) each; a variant the daemon rejected gets its
    `lead` first cells and dashes, and a note line for under the table."""
    rows, notes = [], []
    for r in res["rows"]:
        if r.get("unsupported"):
            cells = [r["name"], r.get("job", "")][:lead]
            rows.append(cells + ["-"] * (ncols - lead))
            notes.append(f"  {' '.join(cells)}: not supported by this blockd (see FAILED below)")
        else:
            rows.append(fmt(r))
    return rows, notes


COPIES = {True: "identical", False: "DIFFER", None: "-"}


# --------------------------------------------------------------------------
# throughput: on-congestion block vs pull-ahead

def part_throughput(ctx: Ctx, res: dict) -> None:
    a = ctx.args
    by_key = {j.key: j for j in JOBS}
    keys = [k.strip() for k in a.wan_jobs.split(",") if k.strip()]
    if not keys or any(k not in by_key or by_key[k].direction != "write" for k in keys):
        raise BenchError(f"--wan-jobs {a.wan_jobs!r}: write jobs of {', '.join(by_key)}")
    res.update({"rows": [], "warnings": [], "commands": []})
    variants = [("block (default)", {}),
                ("pull-ahead", {"on-congestion": "pull-ahead",
                                "congestion-fill": f"{a.congestion_fill // MiB}MiB"})]
    run_variants(res, [(name, resource, by_key[k]) for k in keys for name, resource in variants],
                 lambda name, resource, job: throughput_one(ctx, res, name, resource, job))


def throughput_one(ctx: Ctx, res: dict, name: str, resource: dict, job) -> dict:
    a = ctx.args
    label = f"wan-{job.key}-{'pull' if resource else 'block'}"
    w = WanPair(ctx, label, resource)
    row: dict = {"name": name, "job": job.title, "resource": resource}
    try:
        p = w.p
        io = p.export_size // MiB * MiB
        out = p.dir / f"fio-{job.key}.json"
        cmd = fio_cmd(job, p.uri, io, a, out)
        st0 = w.stats()
        samp = Sampler(w)
        t0 = time.monotonic()
        summary, meta = run_fio_measured(
            ctx, f"fio {job.key} {label}", p.kids, cmd, out, job, a.runtime + a.ramp + 300,
            roles=p.roles, after=lambda: w.in_sync(f"{job.title}"))
        total_s = time.monotonic() - t0
        seen = samp.stop()
        st1 = w.stats()
        q = meta["after"]
        sent = (delta(st0, st1, "replicated_bytes") or 0) + (delta(st0, st1, "resync_sent_bytes") or 0)
        row.update(summary=summary, quiesce=q, seen=seen, cmd=shlex_join(cmd),
                   catchup_s=q["drain_s"], quiet=q["quiet"], sent_bytes=sent,
                   link_mibs=sent / MiB / total_s if total_s else None,
                   fio_write_bytes=json.loads(out.read_text())["jobs"][0]["write"]["io_bytes"])
        log(f"{label}: {summary['mibs']:.1f} MiB/s for the application, in sync "
            f"{q['drain_s']:.1f}s after fio; states {seen['states']}")
    finally:
        w.finish(res, row, name)
    return row


def render_throughput(res: dict) -> str:
    hdr = ["policy", "job", "app MiB/s", "IOPS", "p99 us", "wrote MiB", "sent MiB",
           "catch-up s", "link MiB/s", "CPU us/req", "P+S us/req", "states seen", "copies"]

    def fmt(r: dict) -> list[str]:
        s = r.get("summary", {})
        return [r["name"], r["job"], fmt_num(s.get("mibs"), 1), fmt_num(s.get("iops")),
                fmt_num(s.get("p99_us")),
                fmt_num(r["fio_write_bytes"] / MiB), fmt_num(r["sent_bytes"] / MiB),
                f"{r['catchup_s']:.1f}" + ("" if r["quiet"] else " (timeout)"),
                fmt_num(r.get("link_mibs"), 1), fmt_cpu_us(s.get("cpu_us")),
                fmt_roles_us(s), "/".join(r["seen"]["states"]) or "-", COPIES[r.get("identical")]]
    rows, notes = variant_rows(res, len(hdr), 2, fmt)
    out = ["# wan throughput: protocol A, fio through NBD on alpha (one connection, fio's random "
           "data, time based), fresh pair per row;",
           "#   app MiB/s, IOPS, p99 (clat) = fio; wrote = fio's measured window; sent = growth of "
           "alpha's replicated_bytes + resync_sent_bytes (ramp and catch-up included);",
           "#   catch-up s = after fio, until alpha reports Established, unsent 0, out_of_sync 0; "
           "link MiB/s = sent / (fio wall + catch-up);",
           "#   CPU us/req as in the main table (catch-up included); states = alpha's replication "
           f"states seen every {SAMPLE_S}s; copies = data regions compared after stop"]
    return "\n".join(out + render_rows(hdr, rows, left=2) + notes)


# --------------------------------------------------------------------------
# compression: off vs zstd on half-compressible data

def part_compression(ctx: Ctx, res: dict) -> None:
    a = ctx.args
    res.update({"rows": [], "warnings": [], "commands": [], "bytes": a.compress_bytes})
    zstd = {"compression": "zstd"}
    if a.compression_level is not None:
        zstd["compression-level"] = a.compression_level
    run_variants(res, [("off (default)", {}), ("zstd", zstd)],
                 lambda name, resource: compression_one(ctx, res, name, resource))


def compression_one(ctx: Ctx, res: dict, name: str, resource: dict) -> dict:
    a = ctx.args
    label = f"wan-compress-{'zstd' if resource else 'off'}"
    w = WanPair(ctx, label, resource)
    row: dict = {"name": name, "resource": resource}
    try:
        p = w.p
        n = min(a.compress_bytes, p.export_size // MiB * MiB)
        out = p.dir / "fio-compress.json"
        cmd = ["fio", "--name=compress", "--ioengine=nbd", f"--uri={p.uri}", "--rw=write",
               "--bs=1M", "--iodepth=8", "--numjobs=1", f"--size={n}",
               "--buffer_compress_percentage=50", "--refill_buffers", "--randrepeat=0",
               "--output-format=json", f"--output={out}"]
        st0 = w.stats()
        cpu0 = {c.name: proc_cpu_seconds([c.pid]) for c in p.kids}
        t0 = time.monotonic()
        run_bounded(f"fio compress {label}", cmd, out.with_suffix(".log"),
                    timeout=300 + a.wan_timeout)
        fio_s = time.monotonic() - t0
        q = w.in_sync("the write")
        sync_s = time.monotonic() - t0
        cpu = {p.roles.get(c.name, c.name): proc_cpu_seconds([c.pid]) - cpu0[c.name]
               for c in p.kids}
        st1 = w.stats()
        payload = (delta(st0, st1, "replicated_bytes") or 0) + \
            (delta(st0, st1, "resync_sent_bytes") or 0)
        wire = delta(st0, st1, "sent_wire_bytes")
        wrote = json.loads(out.read_text())["jobs"][0]["write"]["io_bytes"]
        row.update(cmd=shlex_join(cmd), wrote=wrote, payload=payload, wire=wire,
                   ratio=wire / payload if wire is not None and payload else None,
                   fio_s=fio_s, sync_s=sync_s, quiet=q["quiet"], cpu_s=cpu,
                   cpu_ms_per_mib={k: v * 1000 / (wrote / MiB) for k, v in cpu.items()})
        if wire is None:
            p.warn("alpha's status has no sent_wire_bytes (this blockd predates it): "
                   "no ratio")
        log(f"{label}: {wrote / MiB:.0f} MiB in sync after {sync_s:.1f}s; wire {wire}, "
            f"payload {payload}; CPU {cpu}")
    finally:
        w.finish(res, row, name)
    return row


def render_compression(res: dict) -> str:
    hdr = ["compression", "wrote MiB", "payload MiB", "wire MiB", "wire/payload", "fio s",
           "in sync s", "MiB/s", "CPU s P+S", "CPU ms/MiB P+S", "copies"]

    def fmt(r: dict) -> list[str]:
        c, m = r["cpu_s"], r["cpu_ms_per_mib"]
        return [r["name"], fmt_num(r["wrote"] / MiB), fmt_num(r["payload"] / MiB),
                "-" if r["wire"] is None else fmt_num(r["wire"] / MiB),
                fmt_num(r["ratio"], 3), f"{r['fio_s']:.1f}",
                f"{r['sync_s']:.1f}" + ("" if r["quiet"] else " (timeout)"),
                fmt_num(r["wrote"] / MiB / r["sync_s"], 1),
                f"{c.get('Primary', 0):.2f}+{c.get('Secondary', 0):.2f}",
                f"{m.get('Primary', 0):.1f}+{m.get('Secondary', 0):.1f}", COPIES[r.get("identical")]]
    rows, notes = variant_rows(res, len(hdr), 1, fmt)
    out = [f"# wan compression: protocol A, {fmt_size(res['bytes'])} written through NBD on alpha "
           "(fio 1M QD8, buffer_compress_percentage=50, refill_buffers), fresh pair per row;",
           "#   payload = growth of alpha's replicated_bytes + resync_sent_bytes; wire = growth of "
           "its sent_wire_bytes (bytes of frames written to the socket);",
           "#   in sync s = from fio's start until alpha reports Established, unsent 0, "
           "out_of_sync 0; MiB/s = wrote / in sync s;",
           "#   CPU = utime+stime of alpha (Primary) + beta (Secondary) over that time; ms/MiB "
           "per MiB written"]
    return "\n".join(out + render_rows(hdr, rows) + notes)


# --------------------------------------------------------------------------
# catchup: an outage of --outage seconds with a writer, then heal

def part_catchup(ctx: Ctx, res: dict) -> None:
    a = ctx.args
    res.update({"rows": [], "warnings": [], "commands": [], "outage_s": a.outage,
                "rate": a.outage_rate})
    label = "wan-catchup"
    w = WanPair(ctx, label, {})
    row: dict = {"name": "default"}
    res["rows"].append(row)
    try:
        p = w.p
        out = p.dir / "fio-outage.json"
        rate = [] if a.outage_rate in ("0", "") else [f"--rate={a.outage_rate}"]
        cmd = ["fio", "--name=outage", "--ioengine=nbd", f"--uri={p.uri}", "--rw=randwrite",
               "--bs=4k", "--iodepth=8", "--numjobs=1", f"--size={p.export_size // MiB * MiB}",
               *rate, "--time_based", f"--runtime={a.outage}", "--randrepeat=0",
               "--output-format=json", f"--output={out}"]
        st0 = w.stats()
        w.net.set_link(0, False)
        p.commands += w.net.commands[-1:]
        log(f"{label}: link cut; writing for {a.outage}s")
        run_bounded(f"fio outage {label}", cmd, out.with_suffix(".log"), timeout=a.outage + 300)
        at_heal = w.stats()
        row.update(cmd=shlex_join(cmd), at_heal=at_heal,
                   wrote=json.loads(out.read_text())["jobs"][0]["write"]["io_bytes"],
                   dirty=at_heal.get("out_of_sync_bytes"))
        if at_heal.get("connection") == "Connected":
            p.warn(f"alpha still reports its peer Connected after a {a.outage}s outage")
        w.net.set_link(0, True)
        t0 = time.monotonic()
        samples, t_conn = [], None
        while True:
            p.alive_check("during the catch-up")
            s = w.stats()
            now = time.monotonic() - t0
            samples.append({"t": round(now, 3), **s})
            if t_conn is None and s.get("connection") == "Connected":
                t_conn = now
            if (s.get("replication") == "Established" and s.get("disk") == "UpToDate"
                    and s.get("out_of_sync_bytes") == 0):
                break
            if now > a.wan_timeout:
                row["timed_out"] = True
                p.warn(f"not caught up {a.wan_timeout:.0f}s after the heal: {s}")
                break
            time.sleep(POLL_S)
        row.update(catchup_s=time.monotonic() - t0, connect_s=t_conn, samples=samples,
                   resync_sent=delta(st0, w.stats(), "resync_sent_bytes"))
        log(f"{label}: {row['dirty']} bytes out of sync at the heal; caught up after "
            f"{row['catchup_s']:.1f}s (connected after {t_conn}s)")
    finally:
        w.finish(res, row, None)


def render_catchup(res: dict) -> str:
    hdr = ["outage", "writer", "wrote MiB", "dirty MiB at heal", "connect s", "catch-up s",
           "resync sent MiB", "MiB/s", "copies"]
    rows = []
    for r in res["rows"]:
        if "catchup_s" not in r:
            continue
        dirty, t = r.get("dirty"), r["catchup_s"]
        rows.append([f"{res['outage_s']} s", f"4k randwrite QD8 rate {res['rate'] or '-'}",
                     fmt_num(r["wrote"] / MiB),
                     "-" if dirty is None else fmt_num(dirty / MiB, 1),
                     "-" if r.get("connect_s") is None else f"{r['connect_s']:.1f}",
                     f"{t:.1f}" + (" (timeout)" if r.get("timed_out") else ""),
                     "-" if r.get("resync_sent") is None else fmt_num(r["resync_sent"] / MiB, 1),
                     "-" if not dirty or not t else fmt_num(dirty / MiB / t, 1),
                     COPIES[r.get("identical")]])
    out = ["# wan catch-up: protocol A, alpha's veth set down (link cut), fio writes through NBD "
           "on alpha for the outage, then the veth up (heal);",
           "#   dirty = alpha's out_of_sync_bytes at the heal; connect s = heal until alpha's "
           "peer is Connected; catch-up s = heal until it is Established, UpToDate, "
           f"out_of_sync 0 (polled every {POLL_S * 1000:.0f} ms);",
           "#   resync sent = growth of alpha's resync_sent_bytes; MiB/s = dirty / catch-up s"]
    return "\n".join(out + render_rows(hdr, rows, left=2))


# --------------------------------------------------------------------------

def main_wan(args) -> int:
    parts = parse_parts(args.parts, WAN_PARTS)
    if args.wan_rtt_ms < 2 or args.wan_rate_mbit < 1 or args.outage < 1:
        raise BenchError("--wan-rtt-ms >= 2, --wan-rate-mbit >= 1, --outage >= 1")
    table = {
        "throughput": Part(part_throughput, render_throughput, lambda r: bool(r.get("rows"))),
        "compression": Part(part_compression, render_compression, lambda r: bool(r.get("rows"))),
        "catchup": Part(part_catchup, render_catchup, lambda r: bool(r.get("rows"))),
    }
    # Each pair: two sparse devices; the data written is at most their size.
    need = 2 * args.wan_size + GiB // 2

    def setup(ctx: Ctx) -> None:
        ctx.wan_proxy = resolve_proxy(ctx)
    info, results, sections, failed, stamp = run_scenario(args, "wan", parts, table, need,
                                                          setup=setup)
    header = machine_header("wan", info) + [
        f"# link:    {args.wan_rate_mbit} Mbit/s each way (tc tbf on both veth ends), "
        f"{args.wan_rtt_ms} ms RTT ({args.wan_rtt_ms // 2} ms each way in wan-proxy, "
        "userspace, in alpha's namespace); alpha and beta in their own network namespaces",
        f"# pairs:   protocol A, {fmt_size(args.wan_size)} sparse devices, create-md "
        f"--clear-bitmap, shared-secret; fio runtime {args.runtime}s + ramp {args.ramp}s "
        f"(throughput part); {info['workdir']}",
        f"# parts:   {', '.join(parts)}",
    ]
    warns = [f"# WARNING {part}: {w}" for part, r in results.items()
             for w in r.get("warnings", [])]
    cmds = [f"#   {part}: {c}" for part, r in results.items() for c in r.get("commands", [])]
    return finish(args, "wan", header, sections, [], warns, results, info, cmds, failed, stamp)
