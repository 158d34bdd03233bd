"""--preset resync: resync and verify throughput against raw disk copies and
reads, and the write-intent (activity) log's cost.  A scenario (scenario.py):
each part builds its own pair, changes its state (disconnect, write, connect,
verify, reconfigure) and prints its own table."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

from .common import GiB, MiB, BenchError, check_mark, fmt_cpu_us, fmt_lat, fmt_num, fmt_roles_us, \
    fmt_size, log, mibs, render_rows, secs, shlex_join
from .ctx import Ctx
from .fio import JOBS, fio_cmd, median_row, run_fio_measured
from .pair import PAIR_NODES, POLL_S, Nodes, peer
from .procs import evict, run_bounded, spawn, sync_file
from .scenario import Part, finish, machine_header, parse_parts, run_scenario

SCENARIO = ("resync and verify throughput vs raw disk copy/read, write-intent log cost "
            "(--parts resync,verify,al; blockd-c pairs + blockd-standalone)")

RESYNC_PARTS = ("resync", "verify", "al")
RESYNC_TARGET = 0.80          # resync MiB/s / raw copy MiB/s
VERIFY_TARGET = 0.80          # verify MiB/s / raw read MiB/s
BITMAP_BENCH = "cargo bench -p blockd-bench --bench bitmap"


def dd(ctx: Ctx, name: str, args: list[str], timeout: float) -> tuple[float, str]:
    """Runs dd (bounded), returns (seconds, command line)."""
    cmd = ["dd", *args, "status=none"]
    t0 = time.monotonic()
    run_bounded(name, cmd, ctx.tmpdir / "dd.log", timeout=timeout)
    return time.monotonic() - t0, shlex_join(cmd)


def raw_copy(ctx: Ctx, src: Path, nbytes: int, dst: Path, direct: bool) -> tuple[float, str]:
    """Sequential copy of src's first nbytes (a multiple of 1 MiB) to a new file
    on the same filesystem, ending with fsync; src evicted first."""
    evict(src)
    dst.unlink(missing_ok=True)
    flags = ["iflag=direct", "oflag=direct"] if direct else []
    try:
        return dd(ctx, "raw copy", [f"if={src}", f"of={dst}", "bs=1M", f"count={nbytes // MiB}",
                                    *flags, "conv=fsync"], timeout=120 + 120 * nbytes / GiB)
    finally:
        dst.unlink(missing_ok=True)


def raw_read(ctx: Ctx, srcs: list[Path], nbytes: int, direct: bool) -> tuple[float, str]:
    """Sequential read of the first nbytes of each file, all files at once
    (one dd each); each file evicted first.  Returns the wall time."""
    for s in srcs:
        evict(s)
    flags = ["iflag=direct"] if direct else []
    kids, cmds = [], []
    t0 = time.monotonic()
    for i, s in enumerate(srcs):
        cmd = ["dd", f"if={s}", "of=/dev/null", "bs=1M", f"count={nbytes // MiB}", *flags,
               "status=none"]
        kids.append(spawn(f"raw read {i}", cmd, ctx.tmpdir / f"dd-read-{i}.log"))
        cmds.append(shlex_join(cmd))
    deadline = t0 + 120 + 120 * nbytes / GiB
    for k in kids:
        try:
            rc = k.popen.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for kk in kids:
                kk.stop(timeout=2)
            raise BenchError(f"raw read did not finish: {k.cmd}")
        k.stopped = True
        if rc != 0:
            raise BenchError(f"{shlex_join(k.cmd)} failed (exit {rc})\n{k.log_tail()}")
    return time.monotonic() - t0, " & ".join(cmds)


def resync_once(ctx: Ctx, p: Nodes, dirty: int, rep: int) -> dict:
    """disconnect alpha; write `dirty` bytes through NBD; raw copies of the same
    bytes; connect both; time until alpha reports Established + in sync."""
    a = ctx.args
    r: dict = {"rep": rep}
    st0 = p.status("alpha") or {}
    sent0 = peer(st0).get("resync_sent_bytes")
    p.checked("alpha", ["disconnect"])
    st = p.wait_alpha("link down after disconnect",
                      lambda s: peer(s).get("replication") != "Established", 10)
    r["after_disconnect"] = {"connection": peer(st).get("connection"),
                             "replication": peer(st).get("replication")}
    log(f"{p.label}: alpha after disconnect: {r['after_disconnect']}")
    out = p.dir / f"fio-dirty-{rep}.json"
    cmd = ["fio", "--name=dirty", "--ioengine=nbd", f"--uri={p.uri}", "--rw=write", "--bs=1M",
           "--iodepth=8", "--numjobs=1", f"--size={dirty}", "--offset=0",
           f"--randseed={4242 + rep}", "--output-format=json", f"--output={out}"]
    r["write_cmd"] = shlex_join(cmd)
    t0 = time.monotonic()
    run_bounded("fio dirty write", cmd, out.with_suffix(".log"), timeout=120 + 120 * dirty / GiB)
    r["write_s"] = time.monotonic() - t0
    wrote = json.loads(out.read_text())["jobs"][0]["write"]["io_bytes"]
    r["written_bytes"] = wrote
    st1 = p.status("alpha") or {}
    r["oos_after_write"] = peer(st1).get("out_of_sync_bytes")
    r["status_after_write"] = st1
    if wrote != dirty:
        p.warn(f"rep {rep + 1}: fio wrote {wrote} bytes, wanted {dirty}")
    if r["oos_after_write"] != dirty:
        p.warn(f"rep {rep + 1}: alpha reports out_of_sync_bytes {r['oos_after_write']} after "
               f"writing {dirty} bytes while disconnected")
    sync_file(p.disks["alpha"])        # alpha's writes on disk before anything is timed
    # The reference: the same bytes of alpha's file copied sequentially to a new
    # file on the same filesystem, buffered and O_DIRECT, each ending with fsync;
    # once before the resync and once after it (this VM's disk reads faster the
    # second time, host caching, so neither side always gets the warm copy).
    raw = ctx.tmpdir / "raw-copy.img"
    r["raw_copy_buffered_s"], r["raw_copy_direct_s"] = [], []

    def raw_refs():
        t, r["raw_copy_buffered_cmd"] = raw_copy(ctx, p.disks["alpha"], dirty, raw, direct=False)
        r["raw_copy_buffered_s"].append(t)
        t, r["raw_copy_direct_cmd"] = raw_copy(ctx, p.disks["alpha"], dirty, raw, direct=True)
        r["raw_copy_direct_s"].append(t)
    raw_refs()
    p.evict()
    samples = []
    t0 = time.monotonic()
    p.checked("alpha", ["connect"])
    rc, o, e = p.blockctl("beta", ["connect"])    # may be refused: beta was not StandAlone
    r["beta_connect"] = {"exit": rc, "out": (o or e).strip()}
    if rep == 0:
        p.commands.append(shlex_join([str(ctx.blockctl_bin), "--config", str(p.cfg), "--node",
                                      "beta", "connect"]) + f"   # exit {rc}")
    t_connected = None
    deadline = t0 + a.resync_timeout
    while True:
        p.alive_check("during resync")
        st = p.status("alpha") or {}
        pe = peer(st)
        now = time.monotonic() - t0
        samples.append({"t": round(now, 3), **{k: pe.get(k) for k in (
            "connection", "replication", "out_of_sync_bytes", "resync_done_bytes",
            "resync_total_bytes", "resync_sent_bytes", "resync_rate_bytes_per_sec")}})
        if t_connected is None and pe.get("connection") == "Connected":
            t_connected = now
        if pe.get("replication") == "Established" and pe.get("out_of_sync_bytes") == 0:
            break
        if now > a.resync_timeout:
            p.warn(f"rep {rep + 1}: resync not done after {a.resync_timeout:.0f}s: {samples[-1]}")
            r["timed_out"] = True
            break
        time.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))
    r["resync_s"] = time.monotonic() - t0
    t1 = time.monotonic()
    sync_file(p.disks["beta"])          # what the resync left in beta's page cache
    r["beta_fsync_s"] = time.monotonic() - t1
    r["connect_s"] = t_connected
    raw_refs()
    st2 = {n: p.status(n) for n in p.names}
    r["status_after"] = st2
    pe = peer(st2["alpha"])
    sent1 = pe.get("resync_sent_bytes")
    r["sent_bytes"] = sent1 - sent0 if isinstance(sent0, int) and isinstance(sent1, int) else None
    r["done_bytes"] = max((s.get("resync_done_bytes") or 0) for s in samples)
    r["total_bytes"] = max((s.get("resync_total_bytes") or 0) for s in samples)
    rates = [s["resync_rate_bytes_per_sec"] for s in samples
             if isinstance(s.get("resync_rate_bytes_per_sec"), (int, float))]
    r["peak_rate"] = max(rates) if rates else None
    r["samples"] = samples
    r["beta_out_of_sync"] = peer(st2["beta"]).get("out_of_sync_bytes")
    log(f"{p.label}: rep {rep + 1}: resync of {dirty} dirty bytes took {r['resync_s']:.2f}s "
        f"(+{r['beta_fsync_s']:.2f}s beta fsync), sent {r['sent_bytes']}; raw copy "
        f"{secs(r['raw_copy_buffered_s'])} buffered / {secs(r['raw_copy_direct_s'])} direct")
    return r


def part_resync(ctx: Ctx, out: dict) -> None:
    a = ctx.args
    dirty, dev = a.resync_dirty, 2 * a.resync_dirty
    variants: list[dict] = []
    out.update({"dirty": dirty, "device": dev, "variants": variants})
    for rate in [x.strip() for x in a.resync_rates.split(",") if x.strip()]:
        res = {} if rate == "default" else {"resync-rate": rate}
        name = "default (auto)" if rate == "default" else f"resync-rate {rate}"
        label = "resync-" + re.sub(r"[^A-Za-z0-9]", "", rate)
        disks = {}
        d = ctx.server_dir(label)
        for n in PAIR_NODES:
            disks[n] = d / f"disk-{n}.img"
            with open(disks[n], "wb") as f:
                f.truncate(dev)
        p = Nodes(ctx, label, disks)
        p.configure(res)
        p.commands.append(f"truncate -s {dev} {disks['alpha']} {disks['beta']}   # sparse")
        p.create_md("--clear-bitmap")
        p.start()
        if dirty > p.export_size:
            raise BenchError(f"{label}: dirty size {dirty} > export size {p.export_size}")
        v = {"name": name, "label": label, "resource": p.resource, "runs": []}
        variants.append(v)
        try:
            for rep in range(a.repeat):
                v["runs"].append(resync_once(ctx, p, dirty, rep))
        finally:
            v["identical"] = p.stop(compare=not a.no_verify_pair)
            v["commands"], v["warnings"] = p.commands, p.warnings
            v["final_status"] = p.final_status
            v["export_size"] = p.export_size
        shutil.rmtree(d, ignore_errors=True)


def render_resync(res: dict) -> str:
    dirty = res["dirty"]
    hdr = ["resync", "dirty MiB", "connect s", "resync s", "MiB/s", "+fsync s", "MiB/s",
           "xfer MiB/s", "raw buf MiB/s", "raw direct MiB/s", "vs raw", "xfer vs raw",
           "sent MiB", "sent/dirty", "peak rate MiB/s"]
    rows, tgt = [], []
    for v in res["variants"]:
        runs = v["runs"]
        if not runs:
            continue
        def med(k, runs=runs):
            vals = [x for r in runs if r.get(k) is not None
                    for x in (r[k] if isinstance(r[k], list) else [r[k]])]
            return statistics.median(vals) if vals else None
        t, tf = med("resync_s"), med("beta_fsync_s")
        rb, rd = med("raw_copy_buffered_s"), med("raw_copy_direct_s")
        tc = med("connect_s")
        sync_mibs = mibs(dirty, t + tf)
        xfer = mibs(dirty, t + tf - tc) if tc is not None else None
        raw_best = max(mibs(dirty, rb), mibs(dirty, rd))
        ratio = sync_mibs / raw_best if sync_mibs and raw_best else None
        xratio = xfer / raw_best if xfer and raw_best else None
        sent = med("sent_bytes")
        peak = med("peak_rate")
        v["summary"] = {"resync_s": t, "beta_fsync_s": tf, "connect_s": tc,
                        "mibs": mibs(dirty, t), "mibs_incl_fsync": sync_mibs,
                        "xfer_mibs": xfer, "raw_best_mibs": raw_best, "ratio": ratio,
                        "xfer_ratio": xratio, "sent_bytes": sent}
        rows.append([v["name"], f"{med('oos_after_write') / MiB:.0f}"
                     if med("oos_after_write") is not None else "-",
                     "-" if tc is None else f"{tc:.2f}",
                     f"{t:.2f}", fmt_num(mibs(dirty, t)), f"{t + tf:.2f}", fmt_num(sync_mibs),
                     fmt_num(xfer), fmt_num(mibs(dirty, rb)), fmt_num(mibs(dirty, rd)),
                     fmt_num(ratio, 2), fmt_num(xratio, 2),
                     "-" if sent is None else f"{sent / MiB:.0f}",
                     "-" if sent is None else f"{sent / dirty:.3f}",
                     "-" if peak is None else f"{peak / MiB:.0f}"])
        tgt.append(f"  {check_mark(ratio, RESYNC_TARGET)}  resync {v['name']}: >= "
                   f"{RESYNC_TARGET:.2f}x raw copy  got "
                   + ("-" if ratio is None else f"{ratio:.2f}x")
                   + ("" if xratio is None else f"  (transfer alone, after Connected: "
                      f"{xratio:.2f}x)"))
    out = [f"# resync: pair (protocol C) on sparse {fmt_size(res['device'])} files; alpha "
           f"`disconnect`, {fmt_size(dirty)} written through NBD (1M QD8, non-zero), `connect` "
           "on alpha then beta;",
           "#   resync s = connect until alpha's status is Established with out_of_sync 0 "
           f"(polled every {POLL_S * 1000:.0f} ms); +fsync = plus fdatasync of beta's file "
           "(blockd writes buffered);",
           "#   connect s = until alpha's connection is Connected; xfer = dirty / (+fsync s - "
           "connect s);",
           "#   raw = dd of the same bytes of alpha's file to a new file, buffered / O_DIRECT, "
           "conv=fsync, median of one before and one after the resync;",
           "#   vs raw = (+fsync MiB/s) / (faster raw), the target; xfer vs raw = xfer / (faster "
           "raw);",
           "#   dirty MiB = alpha's out_of_sync_bytes after the write; sent = growth of alpha's "
           "resync_sent_bytes over the cycle"]
    out += render_rows(hdr, rows)
    out += tgt
    for v in res["variants"]:
        for r in v["runs"]:
            bc = r.get("beta_connect", {})
            if bc.get("exit") not in (0, None):
                out.append(f"  note: {v['name']} rep {r['rep'] + 1}: `connect` on beta exited "
                           f"{bc['exit']}: {bc.get('out')}")
        ident = v.get("identical")
        out.append(f"  {v['name']}: data regions after stop: "
                   + {True: "identical", False: "DIFFER", None: "not compared"}[ident])
    return "\n".join(out)


def part_verify(ctx: Ctx, res: dict) -> None:
    a = ctx.args
    label = "verify"
    runs: list[dict] = []
    res.update({"size": a.verify_size, "runs": runs, "commands": [], "warnings": []})
    da = ctx.make_disk(label, "-alpha", size=a.verify_size)
    db = ctx.copy_disk(da, label, "-beta")
    p = Nodes(ctx, label, {"alpha": da, "beta": db})
    p.configure({})
    p.commands.append(f"{ctx.prefill_cmds[-1]}   # alpha's file; beta's: cp of it")
    p.create_md("--clear-bitmap")
    res["commands"], res["warnings"] = p.commands, p.warnings
    p.start()

    def raw_refs(r, n):
        # alpha's file alone (buffered, O_DIRECT) and both files at once; taken
        # before and after verify: this VM's disk reads faster the second time.
        for key, srcs, direct in (("raw_buf", [da], False), ("raw_direct", [da], True),
                                  ("raw_two", [da, db], False)):
            t, r[f"{key}_cmd"] = raw_read(ctx, srcs, n, direct=direct)
            r.setdefault(f"{key}_s", []).append(t)
    try:
        for rep in range(a.repeat):
            r = {"rep": rep}
            n = p.export_size // MiB * MiB
            r["raw_bytes"] = n
            raw_refs(r, n)
            p.evict()
            t0 = time.monotonic()
            rc, out, err = p.blockctl("alpha", ["verify"],
                                      timeout=300 + 300 * a.verify_size / GiB)
            r["verify_s"] = time.monotonic() - t0
            r["output"] = (out + err).strip()
            if rc != 0:
                raise BenchError(f"{label}: blockctl verify exited {rc}: {r['output']}")
            m = re.search(r"verify: (\d+) bytes out of sync of (\d+) compared", out)
            if not m:
                raise BenchError(f"{label}: unexpected verify output: {out!r}")
            r["oos"], r["compared"] = int(m.group(1)), int(m.group(2))
            if r["oos"]:
                p.warn(f"verify found {r['oos']} bytes out of sync on an in-sync pair")
            if r["compared"] != p.export_size:
                p.warn(f"verify compared {r['compared']} bytes; the export has {p.export_size}")
            raw_refs(r, n)
            log(f"{label}: rep {rep + 1}: verify {r['compared']} bytes in {r['verify_s']:.2f}s "
                f"({r['oos']} out of sync); raw read {secs(r['raw_buf_s'])} buffered, "
                f"{secs(r['raw_direct_s'])} direct, {secs(r['raw_two_s'])} both files")
            runs.append(r)
    finally:
        res["identical"] = p.stop(compare=False)
        res["commands"], res["warnings"] = p.commands, p.warnings
        res["final_status"] = p.final_status
        res["export_size"] = p.export_size
    shutil.rmtree(p.dir, ignore_errors=True)


def render_verify(res: dict) -> str:
    runs = res["runs"]
    if not runs:
        return "# verify: no run"

    def med(k):
        return statistics.median([x for r in runs
                                  for x in (r[k] if isinstance(r[k], list) else [r[k]])])
    comp, n = med("compared"), med("raw_bytes")
    v = mibs(comp, med("verify_s"))
    rb, rd, r2 = mibs(n, med("raw_buf_s")), mibs(n, med("raw_direct_s")), mibs(n, med("raw_two_s"))
    best = max(rb, rd)
    ratio = v / best if v and best else None
    res["summary"] = {"verify_mibs": v, "raw_best_mibs": best, "ratio": ratio,
                      "ratio_vs_two_files": v / r2 if v and r2 else None}
    hdr = ["verify", "compared MiB", "out of sync", "verify s", "MiB/s", "raw buf MiB/s",
           "raw direct MiB/s", "vs raw", "2 files MiB/s", "vs 2 files"]
    rows = [["blockctl verify (alpha)", f"{comp / MiB:.0f}", f"{med('oos'):.0f}",
             f"{med('verify_s'):.2f}", fmt_num(v), fmt_num(rb), fmt_num(rd), fmt_num(ratio, 2),
             fmt_num(r2), fmt_num(res["summary"]["ratio_vs_two_files"], 2)]]
    out = [f"# verify: in-sync pair (protocol C) on {fmt_size(res['size'])} prefilled files, "
           "create-md --clear-bitmap, idle; `blockctl verify` on alpha, timed to its exit;",
           "#   raw = dd of alpha's file to /dev/null (same bytes, cache evicted), buffered / "
           "O_DIRECT, median of one before and one after verify; vs raw = verify / faster raw;",
           "#   2 files = alpha's and beta's files read at once (both nodes read the same disk "
           "here), MiB/s per file"]
    out += render_rows(hdr, rows)
    out.append(f"  {check_mark(ratio, VERIFY_TARGET)}  verify: >= {VERIFY_TARGET:.2f}x raw read  "
               f"got " + ("-" if ratio is None else f"{ratio:.2f}x"))
    return "\n".join(out)


def part_al(ctx: Ctx, res: dict) -> None:
    """4k randwrite QD32 on a protocol C pair vs blockd-standalone: over a hot
    set with the default al-extents, over the whole device with the default,
    and over the whole device with a small al-extents (extents churn)."""
    a = ctx.args
    label = "al"
    res.update({"size": a.al_size, "cases": [], "standalone_commands": [], "pair_commands": [],
                "warnings": []})
    ds = ctx.make_disk(label, "-standalone", size=a.al_size)
    da = ctx.make_disk(label, "-alpha", size=a.al_size)
    db = ctx.copy_disk(da, label, "-beta")
    single = Nodes(ctx, "al-standalone", {"alpha": ds})
    single.configure({})
    single.start()
    pair = Nodes(ctx, "al-pair", {"alpha": da, "beta": db})
    job = next(j for j in JOBS if j.key == "randwrite")
    cases = [("hot", f"{fmt_size(a.al_hot)} hot set, default al-extents", a.al_hot, {}),
             ("full", "whole device, default al-extents", None, {}),
             ("churn", f"whole device, al-extents = {a.al_extents}", None,
              {"al-extents": a.al_extents})]
    res["standalone_commands"], res["pair_commands"] = single.commands, pair.commands
    md_done = False
    cur = None
    try:
        for key, title, span, extra in cases:
            if cur != extra:
                if md_done:
                    same = pair.stop()
                    if same is False:
                        pair.warn("re-copying alpha's file to beta before create-md "
                                  "--clear-bitmap")
                        shutil.copyfile(da, db)
                        sync_file(db)
                pair.configure(extra)
                pair.create_md(*(["--force"] if md_done else []), "--clear-bitmap")
                md_done = True
                pair.start()
                cur = extra
            io = (span or min(pair.export_size, single.export_size)) // MiB * MiB
            case = {"key": key, "title": title, "io_bytes": io, "resource": pair.resource,
                    "samples": {"blockd-standalone": [], "blockd-c": []}, "al": []}
            res["cases"].append(case)
            order = [("blockd-standalone", single), ("blockd-c", pair)]
            for rep in range(a.repeat):
                for name, nd in order[rep % 2:] + order[:rep % 2]:
                    nd.alive_check(f"before {title}")
                    nd.evict()
                    out = nd.dir / f"fio-{key}-{rep}.json"
                    cmd = fio_cmd(job, nd.uri, io, a, out)
                    log(f"al: {title} / {name}" + (f" (rep {rep + 1})" if a.repeat > 1 else ""))
                    st0 = nd.status("alpha") if nd.pair else None
                    r, meta = run_fio_measured(
                        ctx, f"fio {key} {name}", nd.kids, cmd, out, job, a.runtime + a.ramp + 120,
                        roles=nd.roles, after=nd.quiesce if nd.pair else None)
                    r["loadavg_before"] = meta["loadavg_before"]
                    r["cmd"] = shlex_join(cmd)
                    if nd.pair:
                        q = meta["after"]
                        st1 = nd.status("alpha") or {}
                        t0, t1 = (st0 or {}).get("al_transactions"), st1.get("al_transactions")
                        r["al_transactions"] = t1
                        r["al_transactions_delta"] = t1 - t0 if isinstance(t0, int) and \
                            isinstance(t1, int) else None
                        r["al_hot_extents"] = st1.get("al_hot_extents")
                        r["drain_s"] = q["drain_s"]
                        if not q.get("quiet"):
                            nd.warn(f"not in sync {q['drain_s']:.0f}s after {title}: {q}")
                    case["samples"][name].append(r)
                    for dsk in nd.disks.values():
                        sync_file(dsk)
    finally:
        res["pair_identical"] = pair.stop() if pair.kids else None
        single.stop()
        res["pair_commands"], res["warnings"] = pair.commands, pair.warnings + single.warnings
        res["pair_final_status"] = pair.final_status
    shutil.rmtree(ctx.server_dir(label), ignore_errors=True)


def render_al(res: dict, repeat: int, latency: str) -> str:
    hdr = ["case", "server", "IOPS", "MiB/s", "p50 us", "p99 us", "srv CPU%", "CPU us/req",
           "P+S us/req", "vs standalone",
           "al_transactions", "AL tx/run", "AL tx/s", "al_hot_extents"]
    rows = []
    def num_median(ss):
        return median_row([{k: v for k, v in s.items() if isinstance(v, (int, float))}
                           for s in ss]) if ss else None
    for c in res["cases"]:
        base = num_median(c["samples"]["blockd-standalone"])
        for name in ("blockd-standalone", "blockd-c"):
            ss = c["samples"][name]
            if not ss:
                continue
            m = num_median(ss)
            ratio = m["iops"] / base["iops"] if base and base["iops"] else None
            c.setdefault("summary", {})[name] = {**m, "ratio": ratio}
            dl = m.get("al_transactions_delta")
            wall = m.get("wall_s")
            rows.append([c["title"] if name == "blockd-standalone" else "", name,
                         fmt_num(m["iops"]), fmt_num(m["mibs"], 1), fmt_lat(m["p50_us"]),
                         fmt_lat(m["p99_us"]), fmt_num(m["srv_cpu"]), fmt_cpu_us(m.get("cpu_us")),
                         fmt_roles_us(m), fmt_num(ratio, 2),
                         fmt_num(m.get("al_transactions")), fmt_num(dl),
                         "-" if dl is None or not wall else f"{dl / wall:.0f}",
                         fmt_num(m.get("al_hot_extents"))])
    out = [f"# write-intent log: 4k randwrite QD32 (fio nbd, one connection), {fmt_size(res['size'])} "
           f"prefilled files, protocol C pair vs blockd-standalone (no metadata, no AL);",
           f"#   p50/p99 = {latency}; al_transactions = alpha's status after the run (cumulative), "
           "AL tx/run = its growth over the run (ramp included), AL tx/s = that / fio wall time;",
           "#   CPU us/req and P+S (Primary + Secondary) us/req as in the main table;",
           "#   the pair runs one config (al-extents) per group of cases: create-md --force "
           "--clear-bitmap between them"
           + (f"; medians of {repeat}" if repeat > 1 else "")]
    out += render_rows(hdr, rows, left=2)
    return "\n".join(out)


def main_resync(args) -> int:
    """--preset resync: the resync/verify/write-intent scenario (its own tables)."""
    parts = parse_parts(args.parts, RESYNC_PARTS)
    if args.al_hot > args.al_size // 2:
        raise BenchError("--al-hot must be at most half of --al-size")
    need = GiB // 2 + max(
        (3 * args.resync_dirty) if "resync" in parts else 0,
        (2 * args.verify_size) if "verify" in parts else 0,
        (3 * args.al_size) if "al" in parts else 0)
    table = {
        "resync": Part(part_resync, render_resync, lambda r: bool(r.get("variants"))),
        "verify": Part(part_verify, render_verify, lambda r: bool(r.get("runs"))),
        "al": Part(part_al, partial(render_al, repeat=args.repeat, latency=args.latency),
                   lambda r: bool(r.get("cases"))),
    }
    info, results, sections, failed, stamp = run_scenario(args, "resync", parts, table, need)
    header = machine_header("resync", info) + [
        f"# files:   {info['workdir']}; both nodes on 127.0.0.1 and on the same disk; "
        "each file's page cache evicted (fdatasync + fadvise DONTNEED) before each measurement",
        f"# parts:   {', '.join(parts)}; repeat {args.repeat}"
        f"{' (median)' if args.repeat > 1 else ''}; fio runtime {args.runtime}s + ramp "
        f"{args.ramp}s (write-intent part)",
    ]
    footer = [f"# bitmap micro-benchmarks (Criterion, bitmap set/clear/iterate at 1 TiB @ 4 KiB "
              f"= 2^28 bits; not run here): {BITMAP_BENCH}"]
    warns = []
    for part, r in results.items():
        ws = r.get("warnings", []) if part != "resync" else \
            [f"{v['name']}: {w}" for v in r.get("variants", []) for w in v["warnings"]]
        warns += [f"# WARNING {part}: {w}" for w in ws]
    cmds = []
    if "resync" in results:
        for v in results["resync"].get("variants", []):
            cmds += [f"#   {v['label']}: {c}" for c in v["commands"]]
            if v["runs"]:
                r0 = v["runs"][0]
                cmds += [f"#   {v['label']}: {r0['write_cmd']}",
                         f"#   {v['label']}: {r0['raw_copy_buffered_cmd']}",
                         f"#   {v['label']}: {r0['raw_copy_direct_cmd']}"]
    if "verify" in results:
        cmds += [f"#   verify: {c}" for c in results["verify"].get("commands", [])]
        if results["verify"].get("runs"):
            r0 = results["verify"]["runs"][0]
            cmds += [f"#   verify: {r0[k]}" for k in ("raw_buf_cmd", "raw_direct_cmd", "raw_two_cmd")]
    if "al" in results:
        cmds += [f"#   al standalone: {c}" for c in results["al"].get("standalone_commands", [])]
        cmds += [f"#   al pair: {c}" for c in results["al"].get("pair_commands", [])]
        for c in results["al"].get("cases", []):
            for s in c["samples"]["blockd-c"][:1]:
                cmds.append(f"#   al {c['key']}: {s['cmd']}")
    return finish(args, "resync", header, sections, footer, warns, results, info, cmds, failed,
                  stamp)
