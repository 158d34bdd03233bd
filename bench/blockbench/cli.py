"""Command line: parse the options, dispatch to the main table (matrix.py) or a
scenario preset (resync.py, wan.py), and turn errors and signals into exit
statuses with every child stopped."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from . import resync, wan
from .common import GiB, MiB, BenchError, parse_size
from .fio import JOBS
from .matrix import DEFAULT_SERVERS, PRESETS, SERVERS, list_variants, main_matrix
from .procs import stop_all

# --preset NAME for scenarios with their own flow and tables.
SCENARIOS = {
    "resync": (resync.SCENARIO, resync.main_resync),
    "wan": (wan.SCENARIO, wan.main_wan),
}


def parse_args(argv):
    jobs = ", ".join(j.key for j in JOBS)
    p = argparse.ArgumentParser(
        prog="bench/run", description="fio comparison of blockd against nbdkit (one table).",
        epilog=f"servers: {', '.join(SERVERS)}; jobs: {jobs}. See bench/README.md.")
    p.add_argument("--servers", "--only", dest="servers", default=None,
                   help="comma-separated variants, repeats allowed (nbdkit,nbdkit); "
                        f"default {DEFAULT_SERVERS}")
    p.add_argument("--preset", choices=sorted(PRESETS) + sorted(SCENARIOS),
                   help="a named server list + baseline: " + "; ".join(
                       f"{k} = {v['servers']} (baseline {v['baseline']})"
                       for k, v in PRESETS.items()) + ". --servers/--baseline override it. "
                   "Or a scenario with its own tables: " + "; ".join(
                       f"{k} = {v}" for k, (v, _) in SCENARIOS.items()))
    p.add_argument("--jobs", default=",".join(j.key for j in JOBS),
                   help=f"comma-separated subset of: {jobs}")
    p.add_argument("--size", type=parse_size, default=GiB, help="file size per server (default 1G)")
    p.add_argument("--runtime", type=int, default=8, help="measured seconds per run (default 8)")
    p.add_argument("--ramp", type=int, default=2, help="fio ramp_time seconds (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per (job, server); median reported")
    p.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                   help="tcp = 127.0.0.1 loopback (default), unix = unix socket")
    p.add_argument("--baseline", default=None,
                   help="server label the ratio column divides by (default nbdkit, "
                        "or the preset's)")
    p.add_argument("--latency", choices=("clat", "lat"), default="clat",
                   help="p50/p99 columns from fio clat_ns (default; completion latency, "
                        "excludes submission) or lat_ns (submission + completion)")
    p.add_argument("--no-evict", action="store_true",
                   help="do not drop each server's file from the page cache before each run")
    p.add_argument("--no-build", action="store_true", help="do not cargo build blockd")
    p.add_argument("--blockd-bin", help="blockd binary (default $BLOCKD_BIN or "
                   "TARGET_DIR/release/blockd)")
    p.add_argument("--target-dir", help="cargo target dir to build into and take blockd/blockctl "
                   "from (default $CARGO_TARGET_DIR, else target/ in the repo)")
    p.add_argument("--blockctl-bin", help="blockctl binary, for replicated pairs (default "
                   "$BLOCKCTL_BIN, else next to the blockd binary)")
    p.add_argument("--no-verify-pair", action="store_true",
                   help="do not compare the two disks of a replicated pair after stopping it")
    p.add_argument("--workdir", default=os.environ.get("BENCH_TMPDIR", "/var/tmp"),
                   help="where the temp dir with the backing files goes (on disk, not tmpfs)")
    p.add_argument("--start-timeout", type=float, default=30, help="seconds to wait for a server")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument("--list", action="store_true", help="list server variants and jobs, then exit")
    p.add_argument("--parts", default=None,
                   help="the parts of a scenario preset to run, in order (default all): "
                        f"resync: {','.join(resync.RESYNC_PARTS)}; wan: {','.join(wan.WAN_PARTS)}")
    g = p.add_argument_group("--preset resync")
    g.add_argument("--resync-dirty", type=parse_size, default=GiB,
                   help="bytes written while disconnected (default 1G); the devices are "
                        "sparse files of twice that")
    g.add_argument("--resync-rates", default="10GiB,default",
                   help="one resync measurement per value: a resync-rate for the config, or "
                        "'default' for no resync-rate key (the daemon's auto) "
                        "(default 10GiB,default)")
    g.add_argument("--resync-timeout", type=float, default=300,
                   help="seconds to wait for a resync to finish (default 300)")
    g.add_argument("--verify-size", type=parse_size, default=GiB,
                   help="file size of the verify pair (default 1G)")
    g.add_argument("--al-size", type=parse_size, default=4 * GiB,
                   help="file size of the write-intent part (default 4G)")
    g.add_argument("--al-hot", type=parse_size, default=64 * MiB,
                   help="the hot set of the first write-intent case (default 64M)")
    g.add_argument("--al-extents", type=int, default=64,
                   help="al-extents of the churn case (default 64)")
    wan.add_args(p.add_argument_group("--preset wan"))
    a = p.parse_args(argv)
    if a.runtime < 1 or a.ramp < 0 or a.repeat < 1:
        p.error("--runtime >= 1, --ramp >= 0, --repeat >= 1")
    preset = PRESETS.get(a.preset or "", {})
    if a.servers is None:
        a.servers = preset.get("servers", DEFAULT_SERVERS)
    if a.baseline is None:
        a.baseline = preset.get("baseline", "nbdkit")
    return a



def main(argv) -> int:
    args = parse_args(argv)
    if args.list:
        list_variants()
        for k, (v, _) in SCENARIOS.items():
            print(f"preset  {k:17s} {v}")
        return 0
    if args.preset in SCENARIOS:
        return SCENARIOS[args.preset][1](args)
    return main_matrix(args)


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def entry() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        rc = main(sys.argv[1:])
    except BenchError as e:
        print(f"bench/run: error: {e}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print("bench/run: interrupted", file=sys.stderr)
        rc = 130
    finally:
        stop_all()
    sys.exit(rc)
