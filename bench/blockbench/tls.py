"""TLS variants (`--preset tls`): pairs with mutual TLS on the peer link, NBD
over TLS on blockd standalone and on nbdkit, and the "TLS cost" footer."""

from __future__ import annotations

from functools import partial

from .fio import JOBS
from .pair import start_blockd_pair
from .replication import STANDALONE
from .servers import ServerSpec, start_blockd, start_nbdkit

PRESET = {"servers": "blockd-c,blockd-c-tls,blockd-a,blockd-a-tls,nbdkit,nbdkit-tls,"
                     "blockd-standalone,blockd-standalone-tls",
          "baseline": STANDALONE}

SERVERS_TLS_SINGLE = [
    ServerSpec("nbdkit-tls", partial(start_nbdkit, tls=True),
               "nbdkit file plugin, --tls=require (certificates from blockctl gen-certs)",
               needs_blockd=True, needs_blockctl=True, transports=("tcp",)),
    ServerSpec("blockd-standalone-tls", partial(start_blockd, engine="auto", tls=True),
               "blockd standalone, nbd-tls = \"require\" (NBD over TLS)",
               needs_blockd=True, needs_blockctl=True, transports=("tcp",)),
]
SERVERS_TLS_PAIR = [
    ServerSpec(f"blockd-{proto.lower()}-tls", partial(start_blockd_pair, protocol=proto, tls=True),
               f"blockd pair, protocol {proto}, mutual TLS 1.3 on the peer link (tls-ca)",
               needs_blockd=True, needs_blockctl=True, disks=2, transports=("tcp",))
    for proto in ("C", "A", "B")
]

# TLS must not halve throughput: IOPS(X-tls) / IOPS(X) for every X-tls in the run.
TLS_MIN_RATIO = 0.5


def render_tls(rows: list[dict]) -> str:
    """The cost of TLS: each X-tls variant against X for the same job."""
    by = {(r["server"], r["job_key"]): r for r in rows}
    pairs = sorted({(r["server"], r["server"][:-4]) for r in rows if r["server"].endswith("-tls")
                    and any(x["server"] == r["server"][:-4] for x in rows)})
    if not pairs:
        return ""
    out = [f"# TLS cost (IOPS with TLS / without, same job; target >= {TLS_MIN_RATIO:.2f}x):"]
    for job in JOBS:
        for tls, plain in pairs:
            a, b = by.get((tls, job.key)), by.get((plain, job.key))
            if not a or not b or not b["iops"]:
                continue
            got = a["iops"] / b["iops"]
            out.append(f"  {'✓' if got >= TLS_MIN_RATIO else '✗'}  {job.title:18s} {tls:22s} vs {plain:18s} "
                       f"{got:.2f}x  ({a['iops']:.0f} vs {b['iops']:.0f} IOPS; srv CPU% "
                       f"{a['srv_cpu']:.0f} vs {b['srv_cpu']:.0f})")
    return "\n".join(out)

