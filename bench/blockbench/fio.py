"""fio: the job list (same parameters for every server), the command line, the
JSON parser, medians, and one measured run with the servers' CPU accounting."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .common import MiB, BenchError
from .machine import loadavg
from .procs import Child, proc_cpu_seconds, run_bounded


@dataclass
class Job:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    direction: str                   # "read" | "write": which fio section to report
    extra: tuple[str, ...] = ()


JOBS = [
    Job("randwrite", "4k randwrite QD32", "randwrite", "4k", 32, "write"),
    Job("randread", "4k randread QD32", "randread", "4k", 32, "read"),
    Job("seqwrite", "1M seqwrite QD8", "write", "1M", 8, "write"),
    Job("seqread", "1M seqread QD8", "read", "1M", 8, "read"),
    # --fsync=1 makes fio's nbd engine send NBD_CMD_FLUSH after every write
    # (--fdatasync is broken with that engine: it stops after one I/O).
    Job("flush", "4k write+flush QD1", "randwrite", "4k", 1, "write", ("--fsync=1",)),
]


def fio_cmd(job: Job, uri: str, size: int, args, out: Path) -> list[str]:
    return [
        "fio", f"--name={job.key}", "--ioengine=nbd", f"--uri={uri}",
        f"--rw={job.rw}", f"--bs={job.bs}", f"--iodepth={job.iodepth}", "--numjobs=1",
        f"--size={size}", "--randrepeat=1", "--lat_percentiles=1",
        "--time_based", f"--runtime={args.runtime}", f"--ramp_time={args.ramp}",
        *job.extra, "--output-format=json", f"--output={out}",
    ]



def parse_fio(path: Path, job: Job, latency: str = "clat") -> dict:
    data = json.loads(path.read_text())
    j = data["jobs"][0]
    if j.get("error"):
        raise BenchError(f"fio reported error {j['error']} in {path}")
    d = j[job.direction]
    pct = d.get(f"{latency}_ns", {}).get("percentile", {})
    lat_pct = d.get("lat_ns", {}).get("percentile", {})
    res = {
        "iops": d["iops"],
        "mibs": d["bw_bytes"] / MiB,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "lat_p50_us": lat_pct.get("50.000000", 0) / 1000,
        "lat_p99_us": lat_pct.get("99.000000", 0) / 1000,
        "ios": d["total_ios"],
        "client_cpu": j.get("usr_cpu", 0) + j.get("sys_cpu", 0),
    }
    sync = j.get("sync") or {}
    spct = sync.get("lat_ns", {}).get("percentile") if sync.get("total_ios") else None
    if spct:
        res["sync_p50_us"] = spct.get("50.000000", 0) / 1000
        res["sync_p99_us"] = spct.get("99.000000", 0) / 1000
    if d["total_ios"] == 0:
        raise BenchError(f"fio did no {job.direction} I/O for {job.title} (see {path})")
    return res


def median_row(samples: list[dict]) -> dict:
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples if k in s]
        out[k] = statistics.median(vals)
    if len(samples) > 1:
        iops = [s["iops"] for s in samples]
        med = statistics.median(iops)
        out["spread_pct"] = (max(iops) - min(iops)) / med * 100 if med else 0.0
    return out


def run_fio_measured(ctx, name: str, kids: list[Child], cmd: list[str], out: Path, job: Job,
                     timeout: float, roles: Optional[dict[str, str]] = None,
                     after: Optional[Callable[[], dict]] = None) -> tuple[dict, dict]:
    """One fio run against the given server processes: fio's parsed summary, plus
    the servers' CPU (utime+stime of every thread of each process, io_uring
    workers included, from /proc/PID/stat):
    - srv_cpu: CPU% of all of them over fio's wall time (100 = one core);
    - cpu_us: CPU microseconds per request: CPU from fio's start until `after`
      (e.g. a pair's drain wait) returned, divided by the requests fio sent over
      ramp + runtime (fio counts the measured window only, so its count is scaled
      by (runtime + ramp) / runtime: the ramp at the measured rate);
    - cpu_us_by_role: the same per role (`roles` maps a child's name to e.g.
      "Primary" / "Secondary"; children without a role are "server").
    Returns (summary: numbers only, for medians; meta: the load average before,
    what `after` returned, CPU per process)."""
    roles = roles or {}
    cpu0 = {c.pid: proc_cpu_seconds([c.pid]) for c in kids}
    load0 = loadavg()
    t0 = time.monotonic()
    run_bounded(name, cmd, out.with_suffix(".log"), timeout=timeout)
    wall = time.monotonic() - t0
    cpu_fio = {c.name: proc_cpu_seconds([c.pid]) - cpu0[c.pid] for c in kids}
    for c in kids:
        if not c.alive():
            raise BenchError(f"{c.name} died during {job.title}\n{c.log_tail()}")
    res = parse_fio(out, job, ctx.args.latency)
    extra = after() if after else None
    cpu_all = {c.name: proc_cpu_seconds([c.pid]) - cpu0[c.pid] for c in kids}
    res["srv_cpu"] = sum(cpu_fio.values()) / wall * 100
    runtime, ramp = ctx.args.runtime, ctx.args.ramp
    requests = res["ios"] * (runtime + ramp) / runtime
    by_role: dict[str, float] = {}
    for c in kids:
        role = roles.get(c.name, "server")
        by_role[role] = by_role.get(role, 0.0) + cpu_all[c.name]
    res["cpu_us"] = sum(cpu_all.values()) / requests * 1e6
    for role, cpu in by_role.items():
        res[f"cpu_us_{role}"] = cpu / requests * 1e6
    res["wall_s"] = wall
    return res, {"loadavg_before": load0, "after": extra,
                 "srv_cpu_pct_by_process": {k: v / wall * 100 for k, v in cpu_fio.items()},
                 "cpu_s_by_process": cpu_all}
