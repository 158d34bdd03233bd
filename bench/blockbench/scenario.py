"""The frame of a scenario preset (`resync`, `wan`): a scenario does not run the
job x server table; it runs named parts, each building its own nodes, changing
their state and filling a result dict that a renderer turns into one table.
A part that fails (a refused verb, a node that exits, a timeout) prints
`# PART FAILED: why` under what it measured, and the other parts still run;
the exit status is then 1."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Callable, Optional

from .common import RESULTS_DIR, BenchError, log
from .ctx import Ctx
from .machine import ensure_tools, loadavg, machine_info, resolve_blockd
from .procs import check_workdir, close_tmpdir, make_tmpdir, stop_running


@dataclass
class NeedsPair:
    """What resolve_blockd asks of a variant: a scenario needs blockd and blockctl."""
    name: str
    needs_blockd: bool = True
    needs_blockctl: bool = True


@dataclass
class Part:
    run: Callable[[Ctx, dict], None]      # fills the result dict
    render: Callable[[dict], str]         # its table
    has_result: Callable[[dict], bool]    # whether there is anything to render


def parse_parts(arg: Optional[str], known: tuple[str, ...]) -> list[str]:
    """--parts (None: all of them, in order)."""
    if arg is None:
        return list(known)
    parts = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in parts if x not in known]
    if not parts or bad:
        raise BenchError(f"unknown --parts {bad}; known: {', '.join(known)}")
    return parts


def run_scenario(args, name: str, parts: list[str], table: dict[str, Part], need_bytes: int,
                 setup: Optional[Callable[[Ctx], None]] = None
                 ) -> tuple[dict, dict, list[str], list[str], str]:
    """Sets up (tools, binaries, temp dir, then `setup(ctx)`), runs each part,
    cleans up.  Returns (machine info, results per part, rendered sections,
    failed parts, stamp)."""
    workdir = check_workdir(args.workdir, need_bytes)
    ensure_tools()
    blockd_bin, blockctl_bin = resolve_blockd(args, [NeedsPair(f"--preset {name}")])
    info = machine_info(args, blockd_bin, workdir)
    info["blockctl"] = str(blockctl_bin)
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    tmpdir = make_tmpdir(workdir)
    ctx = Ctx(args, tmpdir, blockd_bin, blockctl_bin)
    results: dict = {}
    sections: list[str] = []
    failed: list[str] = []
    try:
        if setup:
            setup(ctx)
        for part in parts:
            log(f"part {part}")
            res = results[part] = {}
            p = table[part]
            try:
                p.run(ctx, res)
            except BenchError as e:
                # A misbehaving daemon fails this part only; what it measured is kept.
                log(f"part {part} failed: {e}")
                failed.append(part)
                res["error"] = str(e)
                stop_running()
            text = p.render(res) if p.has_result(res) else f"# {part}: no result"
            if res.get("error"):
                text += f"\n# {part} FAILED: " + res["error"].replace("\n", "\n#   ")
            sections.append(text)
    finally:
        close_tmpdir(tmpdir, args.keep_tmp)
    info["load_end"] = loadavg()
    return info, results, sections, failed, stamp


def machine_header(title: str, info: dict) -> list[str]:
    return [
        f"# blockd bench --preset {title}  {info['date']}  host {info['host']}",
        f"# machine: nproc {info['nproc']} (online {info['cpus_online']}), {info['cpu']}, "
        f"{info['mem']} RAM, kernel {info['kernel']}",
        f"# load:    loadavg {info['load_start']} at start, {info['load_end']} at end "
        "(other work on the machine skews results)",
        f"# tools:   {info['fio']}, libnbd {info['libnbd']}",
        f"# blockd:  {info['blockd']}; blockctl {info['blockctl']}",
    ]


def finish(args, name: str, header: list[str], sections: list[str], footer: list[str],
           warns: list[str], results: dict, info: dict, cmds: list[str], failed: list[str],
           stamp: str) -> int:
    """Prints the report and saves it (text + commands, and JSON) under
    bench/results/<stamp>-<name>.{txt,json}."""
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    if footer:
        text += "\n" + "\n".join(footer) + "\n"
    if warns:
        text += "\n" + "\n".join(warns) + "\n"
    print(text, end="", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    txt_path = RESULTS_DIR / f"{stamp}-{name}.txt"
    json_path = RESULTS_DIR / f"{stamp}-{name}.json"
    txt_path.write_text(text + "\n".join(["", "# commands:"] + cmds) + "\n")
    json_path.write_text(json.dumps({"info": info, "args": vars(args), **results},
                                    indent=1, default=str) + "\n")
    log(f"saved {txt_path} and {json_path}")
    if failed:
        log(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0
