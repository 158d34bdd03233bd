"""Constants, the error type, logging and formatting shared by every module."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
EXPORT = "r0"
MiB = 1 << 20
GiB = 1 << 30


class BenchError(Exception):
    """A failure the user must see; printed without a traceback."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def shlex_join(cmd: list[str]) -> str:
    return shlex.join(cmd)


def fmt_num(v: Optional[float], nd: int = 0) -> str:
    if v is None:
        return "-"
    if nd == 0:
        return f"{v:.0f}"
    return f"{v:.{nd}f}"


def fmt_lat(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def fmt_cpu_us(v: Optional[float]) -> str:
    """CPU microseconds per request."""
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_roles_us(r: dict) -> str:
    """A pair's CPU per request as "Primary+Secondary" ("-" for one server)."""
    p, s = r.get("cpu_us_Primary"), r.get("cpu_us_Secondary")
    return "-" if p is None else f"{fmt_cpu_us(p)}+{fmt_cpu_us(s)}"


def fmt_size(n: int) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def indent(s: str, pfx: str = "      ") -> str:
    return "\n".join(pfx + l for l in s.rstrip("\n").splitlines())


def render_rows(hdr: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned columns like the main table: the first `left` columns
    left-aligned, the rest right-aligned, two spaces apart."""
    w = [max([len(hdr[i])] + [len(r[i]) for r in rows]) for i in range(len(hdr))]

    def line(cells):
        return "  ".join(c.ljust(w[i]) if i < left else c.rjust(w[i])
                         for i, c in enumerate(cells)).rstrip()
    return [line(hdr)] + [line(r) for r in rows]


def mibs(nbytes: Optional[float], secs: Optional[float]) -> Optional[float]:
    if nbytes is None or not secs:
        return None
    return nbytes / MiB / secs


def secs(ts: list[float]) -> str:
    return "/".join(f"{t:.2f}" for t in ts) + "s"


def check_mark(got: Optional[float], want: float) -> str:
    return "-" if got is None else ("✓" if got >= want else "✗")


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 256M, 1G, 1GiB)")
    n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    if n < MiB or n % MiB:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 1 MiB, got {s!r}")
    return n

