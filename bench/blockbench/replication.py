"""Replicated pairs in the main table (`--preset replication`): the pair
variants (blockd-c, blockd-a, blockd-b, with the engine pinned or not), the
replication issue's targets and the per-pair replication footer."""

from __future__ import annotations

from functools import partial

from .common import GiB, MiB, fmt_lat, render_rows
from .fio import JOBS, Job
from .pair import peer, start_blockd_pair
from .servers import Handle, ServerSpec

STANDALONE = "blockd-standalone"
PRESET = {"servers": "nbdkit,blockd-standalone,blockd-c,blockd-a", "baseline": STANDALONE}

# Replicated pairs: blockd-c, blockd-a, blockd-b use the default engine (auto);
# blockd-c-posix, blockd-a-uring, ... pin it.
SERVERS_PAIR = [
    ServerSpec(f"blockd-{proto.lower()}{'' if eng == 'auto' else '-' + eng}",
               partial(start_blockd_pair, protocol=proto, engine=eng),
               f"blockd pair, protocol {proto}, --io-engine {eng}: alpha Primary (fio) "
               f"+ beta Secondary over 127.0.0.1",
               needs_blockd=True, needs_blockctl=True, disks=2, transports=("tcp",))
    for proto in ("C", "A", "B") for eng in ("auto", "posix", "uring")
] + [
    ServerSpec(f"blockd-{proto.lower()}-w1",
               partial(start_blockd_pair, protocol=proto, workers=1),
               f"blockd pair, protocol {proto}, worker-threads = 1 on both nodes (a replicated "
               f"node's default is 2)",
               needs_blockd=True, needs_blockctl=True, disks=2, transports=("tcp",))
    for proto in ("C", "A")
]

# The replication issue's targets: IOPS(variant) / IOPS(blockd-standalone) for a
# job, read from the printed table.  Printed as a footer with a check mark each.
TARGETS = [
    ("blockd-c", "randwrite", 0.60), ("blockd-c", "seqwrite", 0.70),
    ("blockd-a", "randwrite", 0.85), ("blockd-a", "seqwrite", 0.85),
    ("blockd-c", "randread", 0.95), ("blockd-c", "seqread", 0.95),
    ("blockd-a", "randread", 0.95), ("blockd-a", "seqread", 0.95),
]


def render_targets(rows: list[dict], latency: str) -> str:
    """The replication issue's targets, computed from the table's rows: needs
    blockd-standalone and at least one of the target variants in the run."""
    by = {(r["server"], r["job_key"]): r for r in rows}
    servers = {r["server"] for r in rows}
    if STANDALONE not in servers or not any(v in servers for v, _, _ in TARGETS):
        return ""
    titles = {j.key: j.title for j in JOBS}
    out = [f"# targets (IOPS vs {STANDALONE}, from the table):"]
    w = max(len(titles[k]) for _, k, _ in TARGETS)
    for variant, key, want in TARGETS:
        if variant not in servers:
            continue
        base, r = by.get((STANDALONE, key)), by.get((variant, key))
        head = f"{variant:8s}  {titles[key]:{w}s}  >= {want:.2f}x"
        if not base or not r or not base["iops"]:
            out.append(f"  -  {head}  (job not run)")
            continue
        got = r["iops"] / base["iops"]
        out.append(f"  {'✓' if got >= want else '✗'}  {head}  got {got:.2f}x  "
                   f"({r['iops']:.0f} vs {base['iops']:.0f} IOPS)")
    # write+flush QD1: latencies (no target, for the record).
    base = by.get((STANDALONE, "flush"))
    for variant in ("blockd-c", "blockd-a"):
        r = by.get((variant, "flush"))
        if not base or not r:
            continue
        tag = variant.split("-", 1)[1].upper()

        def pair(row, a, b):
            return f"{fmt_lat(row.get(a))}/{fmt_lat(row.get(b))}"
        out.append(
            f"  write+flush QD1 p50/p99 {tag} vs standalone (us): "
            f"flush {pair(r, 'sync_p50_us', 'sync_p99_us')} vs "
            f"{pair(base, 'sync_p50_us', 'sync_p99_us')}; "
            f"write {latency} {pair(r, 'p50_us', 'p99_us')} vs {pair(base, 'p50_us', 'p99_us')}; "
            f"write lat {pair(r, 'lat_p50_us', 'lat_p99_us')} vs "
            f"{pair(base, 'lat_p50_us', 'lat_p99_us')}; "
            f"IOPS {r['iops']:.0f} vs {base['iops']:.0f} "
            f"({r['iops'] / base['iops']:.2f}x)" if base["iops"] else "")
    return "\n".join(out)


def render_replication(pairs: list[tuple[str, Handle]], raw_runs: list[dict],
                       jobs: list[Job]) -> str:
    """Per pair: bytes alpha sent to beta during each run (alpha's
    `status --json` replicated_bytes, before/after; includes the ramp) next to
    what fio wrote in the measured window, the drain wait, and the end state."""
    titles = {j.key: j.title for j in jobs}
    rows = []
    for label, h in pairs:
        for run in raw_runs:
            if run["server"] != label:
                continue
            d = run.get("replicated_bytes_delta")
            wrote = run["fio"]["jobs"][0]["write"]["io_bytes"]
            q = run.get("quiesce", {})
            rows.append([label, titles[run["job"]] + (f" #{run['rep'] + 1}" if run["rep"] else ""),
                         "-" if d is None else f"{d / MiB:.0f}",
                         f"{wrote / MiB:.0f}",
                         "-" if "drain_s" not in q else f"{q['drain_s']:.2f}"])
    hdr = ["server", "job", "replicated MiB", "fio wrote MiB", "drain s"]
    out = ["# replication: alpha `blockctl status --json` replicated_bytes, delta over each run "
           "(ramp included); fio wrote = measured window only"] + render_rows(hdr, rows, left=2)
    for label, h in pairs:
        end = h.extra.get("status_at_end") or {}
        p = peer(end.get("alpha"))
        pb = peer(end.get("beta"))
        ident = h.extra.get("peer_identical")
        out.append(
            f"{label}: at end replicated_bytes {p.get('replicated_bytes')} "
            f"({(p.get('replicated_bytes') or 0) / GiB:.2f} GiB), {p.get('replication')}, "
            f"out_of_sync {p.get('out_of_sync_bytes')}, unsent {(end.get('alpha') or {}).get('unsent_bytes')}; "
            f"beta: {(end.get('beta') or {}).get('role')}/{(end.get('beta') or {}).get('disk')}, "
            f"{pb.get('replication')}; data regions after stop: "
            + ({True: "identical", False: "DIFFER", None: "not compared"}[ident]))
    return "\n".join(out)

