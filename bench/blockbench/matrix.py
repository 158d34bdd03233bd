"""The main table: every selected server variant serves its own freshly
preallocated file of the same size; fio runs the same job list against each of
them, interleaved per job; one table (plus the footers of the presets
`replication` and `tls`)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Optional

from . import replication, tls
from .common import GiB, MiB, RESULTS_DIR, BenchError, fmt_cpu_us, fmt_lat, fmt_num, \
    fmt_roles_us, fmt_size, log, render_rows, shlex_join
from .ctx import Ctx
from .fio import Job, fio_cmd, median_row, run_fio_measured
from .machine import ensure_tools, load_range, loadavg, machine_info, resolve_blockd
from .procs import capture, check_workdir, close_tmpdir, evict, make_tmpdir, sync_file
from .servers import SERVERS_SINGLE, Handle, ServerSpec

# THE server table.  Add a variant to the list of its module (see README
# "Adding a server variant").
SERVERS: dict[str, ServerSpec] = {s.name: s for s in (
    SERVERS_SINGLE + tls.SERVERS_TLS_SINGLE + replication.SERVERS_PAIR + tls.SERVERS_TLS_PAIR)}
DEFAULT_SERVERS = "nbdkit,blockd-posix,blockd-uring"

# --preset NAME: a server list and baseline (explicit --servers/--baseline win).
PRESETS = {"replication": replication.PRESET, "tls": tls.PRESET}


def render_table(rows: list[dict], baseline: Optional[str], repeat: int,
                 gap: bool = True) -> str:
    has_sync = any("sync_p50_us" in r for r in rows)
    has_roles = any("cpu_us_Primary" in r for r in rows)
    hdr = ["job", "server", "IOPS", "MiB/s", "p50 us", "p99 us"]
    if has_sync:
        hdr += ["sync p50", "sync p99"]
    hdr += ["srv CPU%", "CPU us/req"]
    if has_roles:
        hdr += ["P+S us/req"]
    hdr += [f"vs {baseline or '-'}"]
    if repeat > 1:
        hdr += ["IOPS spread"]
    table = []
    for r in rows:
        cells = [r["job"], r["server"], fmt_num(r["iops"]), fmt_num(r["mibs"], 1),
                 fmt_lat(r["p50_us"]), fmt_lat(r["p99_us"])]
        if has_sync:
            cells += [fmt_lat(r.get("sync_p50_us")), fmt_lat(r.get("sync_p99_us"))]
        cells += [fmt_num(r["srv_cpu"]), fmt_cpu_us(r.get("cpu_us"))]
        if has_roles:
            cells += [fmt_roles_us(r)]
        cells += [fmt_num(r.get("ratio"), 2)]
        if repeat > 1:
            cells += [f"{r['spread_pct']:.1f}%"]
        table.append(cells)
    lines = render_rows(hdr, table, left=2)
    out = [lines[0]]
    prev_job = None
    for r, line in zip(rows, lines[1:]):
        if gap and prev_job is not None and r["job"] != prev_job:
            out.append("")
        prev_job = r["job"]
        out.append(line)
    return "\n".join(out)


def list_variants() -> None:
    """--list (the scenarios are added by the caller)."""
    from .fio import JOBS
    for s in SERVERS.values():
        print(f"server  {s.name:17s} {s.description} [transports: {','.join(s.transports)}]")
    for j in JOBS:
        print(f"job     {j.key:17s} {j.title}: --rw={j.rw} --bs={j.bs} --iodepth={j.iodepth} "
              f"{' '.join(j.extra)}")
    for k, v in PRESETS.items():
        print(f"preset  {k:17s} --servers {v['servers']} --baseline {v['baseline']}")


def select(args, jobs_all: list[Job]) -> tuple[list[tuple[str, ServerSpec]], list[Job]]:
    """Instance labels (nbdkit, nbdkit#2, ...: each instance has its own file and
    process) with their specs, and the selected jobs."""
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if not names or unknown:
        raise BenchError(f"unknown server(s) {unknown}; known: {', '.join(SERVERS)}")
    labels, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        labels.append((n if seen[n] == 1 else f"{n}#{seen[n]}", SERVERS[n]))
    for _, s in labels:
        if args.transport not in s.transports:
            raise BenchError(f"server {s.name} does not support --transport {args.transport} "
                             f"(supports {', '.join(s.transports)}); use the same transport for all")
    by_key = {j.key: j for j in jobs_all}
    jkeys = [k.strip() for k in args.jobs.split(",") if k.strip()]
    if not jkeys or any(k not in by_key for k in jkeys):
        raise BenchError(f"unknown job in {args.jobs!r}; known: {', '.join(by_key)}")
    return labels, [by_key[k] for k in jkeys]


def run_one(ctx: Ctx, h: Handle, job: Job, rep: int, io_size: int) -> tuple[dict, dict]:
    """One fio run of `job` against `h`: (summary for the table, run record for
    the JSON)."""
    args = ctx.args
    label = h.label
    for c in h.children:
        if not c.alive():
            raise BenchError(f"{c.name} died (status {c.popen.returncode}) "
                             f"before {job.title}\n{c.log_tail()}")
    if not args.no_evict:
        for dsk in h.disks:
            evict(dsk)
    out = ctx.server_dir(label) / f"fio-{job.key}-{rep}.json"
    cmd = fio_cmd(job, h.uri, io_size, args, out)
    stats0 = h.stats_hook(h) if h.stats_hook else None
    # The drain wait after the run (protocol A's backlog) is billed to the
    # requests in CPU us/req, not in srv CPU%.
    res, meta = run_fio_measured(ctx, f"fio {job.key} {label}", h.children, cmd, out, job,
                                 args.runtime + args.ramp + 120, roles=h.roles,
                                 after=(lambda: h.quiesce_hook(h)) if h.quiesce_hook else None)
    run = {"job": job.key, "server": label, "rep": rep, "cmd": shlex_join(cmd), "summary": res,
           "loadavg_before": meta["loadavg_before"],
           "srv_cpu_pct_by_process": meta["srv_cpu_pct_by_process"],
           "cpu_s_by_process": meta["cpu_s_by_process"]}
    q = meta["after"]
    if q is not None:
        run["quiesce"] = q
        if not q.get("quiet", True):
            h.warn(f"not quiet {q['drain_s']:.0f}s after {job.title}: {q}")
    if h.stats_hook:
        stats1 = h.stats_hook(h)
        run["server_stats"] = {"before": stats0, "after": stats1}
        rb0, rb1 = (stats0 or {}).get("replicated_bytes"), stats1.get("replicated_bytes")
        if isinstance(rb0, int) and isinstance(rb1, int):
            run["replicated_bytes_delta"] = rb1 - rb0
            if job.direction == "write" and rb1 - rb0 <= 0:
                h.warn(f"{job.title}: replicated_bytes did not grow "
                       f"({rb0} -> {rb1}): writes did not reach the peer")
        if stats1.get("replication") not in (None, "Established"):
            h.warn(f"{job.title}: link is {stats1.get('replication')!r} after the run")
    run["fio"] = json.loads(out.read_text())
    # Write back what this server left dirty so the next server does not pay
    # for it (not part of the measurement).
    for dsk in h.disks:
        sync_file(dsk)
    return res, run


def main_matrix(args) -> int:
    from .fio import JOBS
    labels, jobs = select(args, JOBS)
    label_names = [l for l, _ in labels]
    baseline = args.baseline if args.baseline in label_names else None
    if baseline is None:
        log(f"warning: baseline {args.baseline!r} is not among {label_names}; no ratio column")
    workdir = check_workdir(args.workdir, sum(s.disks for _, s in labels) * args.size + GiB // 2)
    ensure_tools()
    specs = [s for _, s in labels]
    blockd_bin, blockctl_bin = resolve_blockd(args, specs)
    info = machine_info(args, blockd_bin, workdir)
    info["blockctl"] = str(blockctl_bin) if blockctl_bin else None
    try:
        load1 = float(info["load_start"].split()[0])
        if load1 > 0.5 * info["nproc"]:
            log(f"warning: load average {load1} on {info['nproc']} CPUs: other work is running; "
                "expect noisy numbers (use --repeat, or run on a quiet machine)")
    except ValueError:
        pass

    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    tmpdir = make_tmpdir(workdir)
    ctx = Ctx(args, tmpdir, blockd_bin, blockctl_bin)
    handles: dict[str, Handle] = {}
    raw_runs = []
    stopped_ok = True
    completed = False
    try:
        for label, spec in labels:
            log(f"starting {label}")
            h = spec.start(ctx, label)
            handles[label] = h
            h.export_size = int(capture(["nbdinfo", "--size", h.uri], timeout=30).strip())
            log(f"{label}: {h.uri} export size {h.export_size}")
        sizes = {h.export_size for h in handles.values()}
        io_size = min(sizes) // MiB * MiB
        if io_size <= 0:
            raise BenchError(f"export sizes {sizes} too small")
        if len(sizes) > 1:
            log(f"export sizes differ {sorted(sizes)}; fio uses the first {io_size} bytes of each")

        samples: dict[tuple[str, str], list[dict]] = {}
        total = len(jobs) * args.repeat * len(labels)
        n = 0
        for job in jobs:
            for rep in range(args.repeat):
                order = label_names[rep % len(label_names):] + label_names[:rep % len(label_names)]
                for label in order:
                    n += 1
                    log(f"[{n}/{total}] {job.title} / {label}" +
                        (f" (rep {rep + 1}/{args.repeat})" if args.repeat > 1 else ""))
                    res, run = run_one(ctx, handles[label], job, rep, io_size)
                    samples.setdefault((job.key, label), []).append(res)
                    raw_runs.append(run)

        rows = []
        for job in jobs:
            base = median_row(samples[(job.key, baseline)]) if baseline else None
            for label in label_names:
                r = median_row(samples[(job.key, label)])
                r.update(job=job.title, job_key=job.key, server=label)
                if base and base["iops"]:
                    r["ratio"] = r["iops"] / base["iops"]
                rows.append(r)

        commands = {l: h.commands for l, h in handles.items()}
        completed = True
    finally:
        log("stopping servers")
        for h in reversed(list(handles.values())):
            if not completed:
                h.post_stop_hook = None   # no disk comparison on the way out of an error
            try:
                h.stop()
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"stopping {h.label}: {e}")
                stopped_ok = False
        close_tmpdir(tmpdir, args.keep_tmp)

    info["load_end"] = loadavg()
    pairs = [(l, h) for l, h in handles.items() if h.extra.get("kind") == "pair"]
    text = "\n".join(header(args, info, handles, raw_runs, io_size, label_names, pairs))
    text += "\n\n" + render_table(rows, baseline, args.repeat, gap=len(labels) > 1) + "\n"
    footer = replication.render_targets(rows, args.latency)
    if footer:
        text += "\n" + footer + "\n"
    tls_footer = tls.render_tls(rows)
    if tls_footer:
        text += "\n" + tls_footer + "\n"
    if pairs:
        text += "\n" + replication.render_replication(pairs, raw_runs, jobs) + "\n"
    warns = [f"# WARNING {l}: {w}" for l, h in handles.items() for w in h.warnings]
    if warns:
        text += "\n" + "\n".join(warns) + "\n"
    print(text, end="", flush=True)

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    cmd_lines = ["", "# server commands:"]
    for l, cs in commands.items():
        cmd_lines += [f"#   {l}: {c}" for c in cs]
    cmd_lines += ["# prefill: " + (ctx.prefill_cmds[0] if ctx.prefill_cmds else "-"),
                  "# fio (one per job; URI per server):"]
    for job in jobs:
        cmd_lines.append("#   " + shlex_join(fio_cmd(job, "URI", io_size, args, Path("OUT.json"))))
    txt_path = RESULTS_DIR / f"{stamp}.txt"
    json_path = RESULTS_DIR / f"{stamp}.json"
    txt_path.write_text(text + "\n".join(cmd_lines) + "\n")
    json_path.write_text(json.dumps({
        "info": info, "args": {k: v for k, v in vars(args).items()},
        "servers": {l: {"uri": h.uri, "commands": h.commands, "export_size": h.export_size,
                        "engine": h.engine, "warnings": h.warnings, **h.extra}
                    for l, h in handles.items()},
        "io_size": io_size, "baseline": baseline, "rows": rows, "runs": raw_runs,
    }, indent=1) + "\n")
    log(f"saved {txt_path} and {json_path}")
    return 0 if stopped_ok else 1


def header(args, info: dict, handles: dict[str, Handle], raw_runs: list[dict], io_size: int,
           label_names: list[str], pairs: list[tuple[str, Handle]]) -> list[str]:
    out = [
        f"# blockd bench  {info['date']}  host {info['host']}",
        f"# machine: nproc {info['nproc']} (online {info['cpus_online']}), {info['cpu']}, "
        f"{info['mem']} RAM, kernel {info['kernel']}",
        f"# load:    loadavg {info['load_start']} at start, {info['load_end']} at end"
        f"{load_range(raw_runs)} (other work on the machine skews results)",
        f"# tools:   {info['fio']}, {info['nbdkit']}, libnbd {info['libnbd']}",
    ]
    if info["blockd"]:
        out.append(f"# blockd:  {info['blockd']}"
                   + (f"; blockctl {info['blockctl']}" if info.get("blockctl") else ""))
    engines = [f"{l} {h.engine}" for l, h in handles.items() if h.engine]
    out += [
        f"# files:   {fmt_size(args.size)} per server, preallocated (written once), "
        f"{info['workdir']}; fio I/O range {fmt_size(io_size)}",
        f"# fio:     ioengine=nbd numjobs=1 (one connection), transport {args.transport}"
        f"{' 127.0.0.1' if args.transport == 'tcp' else ''}, runtime {args.runtime}s "
        f"+ ramp {args.ramp}s, repeat {args.repeat}"
        f"{' (median)' if args.repeat > 1 else ''}, p50/p99 = {args.latency}, page cache "
        f"{'kept' if args.no_evict else 'evicted before each run'}",
        f"# servers: {', '.join(label_names)}"
        + (f"; blockd io engines: {', '.join(engines)}" if engines else ""),
        "# cpu:     CPU us/req = utime+stime of the server's processes (all threads) from fio's "
        "start until the server is quiet again, / requests over ramp + runtime",
    ]
    if args.preset:
        out.append(f"# preset:  {args.preset} (baseline {args.baseline})")
    if pairs:
        out.append("# pairs:   " + "; ".join(
            f"{l} = protocol {h.extra['protocol']}, alpha Primary (fio) + beta Secondary on "
            "127.0.0.1, internal meta, create-md --clear-bitmap, Established after "
            f"{h.extra['established_after_s']:.2f}s" for l, h in pairs))
        out.append("#          srv CPU% of a pair = both nodes, P+S us/req = Primary + Secondary; "
                   "after each run the script waits until alpha has no unsent or out-of-sync "
                   "bytes (not in fio's figures; its CPU is in CPU us/req)")
    return out
