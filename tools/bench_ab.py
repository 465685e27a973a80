#!/usr/bin/env python3
"""Before/after: ptprobe's hit cost at two revisions, measured in one run.

    python3 tools/bench_ab.py [--base REV] [--after REV[,REV...]] [--runs N] [--hits N] [--cases a,b,...]

The working tree's ptprobe (after; or the one at --after REV) and the one at
REV (before; default HEAD, extracted with ``git archive`` into a temporary
directory) trace the same
target (tools/bench_target.c, built once), alternating case by case and run by
run, so that both see the same machine state. Tracer and program are pinned to
one CPU (the ``same`` placement of tools/bench.py). Prints the median us per hit
of each side and their ratio (after/before: below 1 is faster), by the target's
own clock (wall) and as CPU time of tracer and target per hit, which a machine
shared with other work inflates much less. The C-return and
C-int3 cases run the C limit (tools/ctracer.c) in the same turns, for ratios to
it taken in the same run. Every case
measures the stop path: sessions run with ``in_program=False``, so that a probe
without a handler stops instead of counting inside the program.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent

#: name -> (site in bench_target.c, mechanism: return|seed|int3, handler)
CASES = {
    "return": ("nop5", "return", False),
    "return+handler": ("nop5", "return", True),
    "return+args": ("nop5", "return", "args"),
    "seed": ("nop5", "seed", False),
    "seed+handler": ("nop5", "seed", True),
    "int3": ("nop5", "int3", False),
    "int3+handler": ("nop5", "int3", True),
    "int3+args": ("nop5", "int3", "args"),
    "int3-push": ("push", "int3", False),
    "usdt-nop1+nop5": ("usdt_nop1_5", "return", False),
    # the C limit (tools/ctracer.c, the same for every revision), for ratios taken in the same run
    "C-return": ("", "return", "C"),
    "C-int3": ("", "int3", "C"),
}

# Runs in a child Python whose sys.path starts with one tree; prints ns per hit.
_DRIVER = r"""
import inspect, json, os, resource, sys
import ptprobe
target, site, mechanism, handler, n, outfile, cpu, tree = sys.argv[1:9]
n = int(n); cpu = int(cpu)
assert os.path.realpath(ptprobe.__file__).startswith(os.path.realpath(tree) + os.sep), ptprobe.__file__
os.sched_setaffinity(0, {cpu})
def trivial(hit):
    pass
def args(hit):
    hit.args[0]
handlers = {"False": None, "True": trivial, "args": args}
slots = "seed" if mechanism == "seed" else "return"
options = dict(slots=slots, seccomp=mechanism != "int3", colocate=False)
# in_program=False: a probe without a handler must stop (it would otherwise count
# inside the program, and the case would not measure the stop path); a tree from
# before in-program actions has no such option and always stops
if "in_program" in inspect.signature(ptprobe.Session).parameters:
    options["in_program"] = False
session = ptprobe.run([target, site, str(n), "1", "200", outfile], **options)
with session:
    os.sched_setaffinity(session.main_pid, {cpu})
    probe = session.probe(f"uprobe:{target}:site_{site}", handlers[handler])
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    status = session.wait()
    own2, children2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
assert status == 0, status
assert probe.hits == n + 200, probe.hits
line = open(outfile).read().split()
values = dict(t.split("=") for t in line if "=" in t)
cpu_s = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in ((own, own2), (children, children2)))
print(json.dumps([int(values["ns"]) / int(values["iterations"]), cpu_s * 1e9 / (n + 200)]))
"""


def build_target(workdir: Path) -> str:
    target = workdir / "bench_target"
    subprocess.run(["gcc", "-O2", "-fno-pie", "-no-pie", "-pthread", str(TOOLS / "bench_target.c"),
                    "-o", str(target)], check=True, capture_output=True, text=True)
    sys.path.insert(0, str(REPO))
    from ptprobe import arch
    subprocess.run(["gcc", "-O2", "-pthread", f"-DSLOT_NR={arch.SLOT_SYSCALL_NR:#x}", str(TOOLS / "ctracer.c"),
                    "-o", str(workdir / "ctracer")], check=True, capture_output=True, text=True)
    return str(target)


def c_limit_once(target: str, mode: str, n: int, cpu: int) -> List[float]:
    """(wall, CPU) us per hit of the C limit: tools/ctracer.c, tracer and child on *cpu*."""
    ctracer = os.path.join(os.path.dirname(target), "ctracer")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([ctracer, mode, str(n), "1", "200", str(cpu), str(cpu)], capture_output=True, text=True,
                         timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"bench_ab: ctracer {mode} failed: {out.stderr.strip()[-500:]}")
    values = dict(t.split("=") for t in out.stdout.split() if "=" in t)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return [int(values["ns"]) / int(values["iterations"]) / 1000.0, cpu_s * 1e6 / (n + 200)]


def extract(rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "ptprobe"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def once(tree: Path, target: str, case: str, n: int, outfile: str, cpu: int) -> List[float]:
    """(wall, CPU) us per hit of one run of *case* with the ptprobe of *tree*."""
    site, mechanism, handler = CASES[case]
    if handler == "C":
        return c_limit_once(target, mechanism, n, cpu)
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    # cwd=tree: "python -c" puts the working directory first on sys.path, ahead of
    # PYTHONPATH, so run from elsewhere both sides would import the same ptprobe
    out = subprocess.run([sys.executable, "-c", _DRIVER, target, site, mechanism, str(handler), str(n),
                          outfile, str(cpu), str(tree)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=str(tree))
    if out.returncode != 0:
        raise SystemExit(f"bench_ab: {case} in {tree} failed: {out.stderr.strip()[-500:]}")
    return [ns / 1000.0 for ns in json.loads(out.stdout.strip().splitlines()[-1])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the 'before' revision (default HEAD)")
    parser.add_argument("--after", default=None,
                        help="the 'after' revision, or several, comma-separated, each compared with the "
                             "base (default: the working tree)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--cpu", type=int, default=None, help="the CPU to run on (default: the lowest allowed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    cpu = min(os.sched_getaffinity(0)) if args.cpu is None else args.cpu
    afters = [rev for rev in (args.after or "").split(",") if rev] or [None]
    sides = ["before"] + [rev or "working tree" for rev in afters]
    work = Path(tempfile.mkdtemp(prefix="ptprobe-ab-"))
    try:
        trees: Dict[str, Path] = {}
        for index, (side, rev) in enumerate(zip(sides, [args.base] + afters)):
            if rev is None:
                trees[side] = REPO
                continue
            trees[side] = work / f"tree{index}"
            trees[side].mkdir()
            extract(rev, trees[side])
        target = build_target(work)
        results: Dict[str, Dict[str, List[List[float]]]] = {c: {side: [] for side in sides} for c in cases}
        for run in range(args.runs):
            for case in cases:
                for side in (sides if run % 2 == 0 else sides[::-1]):
                    results[case][side].append(once(trees[side], target, case, args.hits,
                                                     str(work / "out"), cpu))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {c: {side: statistics.median(w for w, _ in v) for side, v in r.items()} for c, r in results.items()}
    cpu_table = {c: {side: statistics.median(t for _, t in v) for side, v in r.items()}
                 for c, r in results.items()}
    min_table = {c: {side: min(w for w, _ in v) for side, v in r.items()} for c, r in results.items()}
    if args.json:
        print(json.dumps({"base": args.base, "after": sides[1:], "runs": args.runs, "hits": args.hits,
                          "us_per_hit": table, "cpu_us_per_hit": cpu_table, "min_us_per_hit": min_table}))
        return 0
    print(f"us per hit, median of {args.runs}, {args.hits} hits, one CPU; before = {args.base}")
    print("wall: the target's own timing; cpu: CPU time of tracer and target per hit (what other")
    print("processes on the CPU do not inflate); wall min: the fastest run; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    for label, data in (("wall", table), ("cpu", cpu_table), ("wall min", min_table)):
        print(f"  {label + ' us/hit':<18}{'before':>9}" + "".join(f"{side[:12]:>13}{'ratio':>7}" for side in sides[1:]))
        for case, row in data.items():
            print(f"  {case:<18}{row['before']:9.2f}"
                  + "".join(f"{row[side]:13.2f}{row[side] / row['before']:7.2f}" for side in sides[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
